"""``lattice recall``: recall and language-modelling quality of Lattice against its peers, every mixer inside the same
litgpt blocks and at equal recurrent state per head.

- :mod:`.task`: the multi-query associative recall (MQAR) generator;
- :mod:`.mixers`: the mixers compared and the litgpt model each one builds (:mod:`lattice_plugin.fla_mixer` adapts
  flash-linear-attention's layers when the optional ``fla`` extra is installed);
- :mod:`.training`: the one training loop every experiment uses; :mod:`.results`: resumable JSON rows;
- :mod:`.mqar`, :mod:`.lm`, :mod:`.passkey`: the three experiments.
"""
