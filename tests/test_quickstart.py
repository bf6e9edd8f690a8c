"""The quickstart's output handling and report (the whole pipeline is what README's first command runs)."""

from lattice_plugin.cli.quickstart import OutputFilter
from lattice_plugin.quickstart_report import format_table, plot_report

PIN_MEMORY = (
    "/venv/torch/utils/data/dataloader.py:665: UserWarning: 'pin_memory' argument is set as true but no accelerator "
    "is found, then device pinned memory won't be used.\n"
)
SOURCE = "  warnings.warn(warn_msg)\n"

REPORT = {
    "perplexity": {"teacher": 207.3, "converted": 1099.9, "stage1": 272.4, "stage2": 244.4},
    "cache_bytes": {
        "teacher": {"128": 131072, "2048": 2097152},
        "student": {"128": 32768, "2048": 32768},
    },
    "decode": {"teacher_tokens_per_sec": 191.0, "student_tokens_per_sec": 134.0},
    "heldout": {"tokens": 43264},
}


def test_a_warning_repeated_by_every_process_is_shown_once_and_its_source_line_never():
    output = OutputFilter()
    kinds = []
    for _ in range(15):
        after = False
        for line in (PIN_MEMORY, SOURCE, "iter 10 step 10 | loss train: 5.1\n"):
            kind, text = output.feed(line, after)
            kinds.append((kind, text))
            after = kind in ("warning", "repeated") or (after and kind == "skip")
    assert [kind for kind, _ in kinds].count("warning") == 1
    assert [kind for kind, _ in kinds].count("repeated") == 14
    assert not any(kind == "status" and "warnings.warn" in text for kind, text in kinds)
    assert kinds[-1] == ("status", "iter 10 step 10 | loss train: 5.1")


def test_report_table_and_picture():
    lines = format_table(REPORT)
    assert "cache @2,048" in lines[0]
    assert "207.30" in lines[2] and "2.0 MiB" in lines[2] and lines[2].endswith("191.0")
    assert "244.40" in lines[-1] and "32.0 KiB" in lines[-1] and lines[-1].endswith("134.0")
    lengths = [128, 2048, 131072]
    curves = {"teacher": [131072, 2097152, 134217728], "student": [32768, 32768, 32768]}
    png = plot_report(REPORT, lengths, curves, block_size=128)
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
