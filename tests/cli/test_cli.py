"""`ssm-split models | layout | plan`, run in-process through the dispatcher, checking what
the tables say rather than that something was printed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib import resources

import pytest

from ssm_split import model, models, page_layout
from ssm_split.layout import rank_units
from ssm_split.specs import preset_info
from ssm_split.cli._main import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def table_rows(text: str, first_header: str) -> list[list[str]]:
    """The rows of the text table whose header starts with `first_header`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines[:-1])
                 if line.startswith(first_header) and lines[i + 1].startswith("---"))
    rows = []
    for line in lines[start + 2:]:  # skip the header and its rule
        if not line.strip() or line.startswith(("conv ", "|", "units and bytes", "* ")) \
                or re.match(r"\d+ reads, ", line):
            break  # the table ends at a blank line or its footer
        rows.append(line.split())
    return rows


def test_models_lists_every_preset_with_its_sizes(capsys):
    rc, out, err = run(capsys, "models")
    assert rc == 0 and err == ""
    rows = {row[0]: row for row in table_rows(out, "preset")}
    assert set(rows) == set(models())
    for name, row in rows.items():
        info = preset_info(name)
        layout = page_layout(info.spec, 1, 0)
        assert row[1] == info.family and row[2] == info.hf_id
        assert [int(v) for v in row[3:7]] == [info.num_state_layers, layout.conv_nbytes,
                                              layout.temporal_nbytes, layout.content_nbytes]
    # vLLM's published Nemotron-Nano-30B page at TP1: (36864, 2097152)
    assert rows["nemotron-3-nano-30b-a3b"][4:6] == ["36864", "2097152"]


def test_models_at_a_tp_that_some_cannot_use(capsys):
    rc, out, _ = run(capsys, "models", "--tp", "16")
    rows = {row[0]: row for row in table_rows(out, "preset")}
    assert rc == 0
    assert rows["falcon-h1-7b"][4:] == ["-", "-", "-", "-"]  # 24 heads on 16 ranks
    # 8 groups on 16 ranks: each rank keeps one whole group of B and C (128 channels each)
    assert rows["nemotron-h-8b"][4:6] == [str((8192 // 16 + 2 * 128) * 3 * 2), str(8 * 64 * 128 * 4)]
    assert "cannot be sharded on tp=16" in out


def test_layout_qwen35_27b_tp8(capsys):
    rc, out, err = run(capsys, "layout", "qwen3.5-27b", "--tp", "8")
    assert rc == 0 and err == ""
    assert "Qwen/Qwen3.5-27B" in out and "48 of 64 layers" in out
    rows = table_rows(out, "segment")  # segment, [units), [bytes), nbytes, size
    # per rank: Q and K 256 channels, V 768 channels, 3 rows of bf16; 6 fp32 heads of 128x128
    assert [(r[0], r[3], int(r[5])) for r in rows] == [
        ("conv.Q", "[0,", 256 * 3 * 2), ("conv.K", "[1536,", 256 * 3 * 2),
        ("conv.V", "[3072,", 768 * 3 * 2), ("temporal", "[7680,", 6 * 128 * 128 * 4)]
    assert "rank 0 of tp=8" in out
    assert re.search(r"^\|Q +\|K +\|V +\|-+temporal-+\|$", out, re.M)


def test_layout_rank_and_all_ranks(capsys):
    rc, out, _ = run(capsys, "layout", "qwen3.5-27b", "--tp", "8", "--rank", "5")
    assert rc == 0 and "rank 5 of tp=8" in out and "rank 0 of" not in out
    # value heads 30 to 35 of 48 live on rank 5: units [30, 36), half-open like UnitRange
    assert [" ".join(r[1:3]) for r in table_rows(out, "segment")] == [
        "[10, 12)", "[10, 12)", "[30, 36)", "[30, 36)"]
    rc, out, _ = run(capsys, "layout", "granite-4.0-h-tiny", "--tp", "4", "--all-ranks")
    assert rc == 0
    assert re.findall(r"page of rank (\d) of tp=4", out) == ["0", "1", "2", "3"]


def test_layout_sd_and_spec_tokens(capsys):
    rc, out, _ = run(capsys, "layout", "nemotron-h-8b", "--tp", "2", "--conv-layout", "SD",
                     "--spec-tokens", "2")
    assert rc == 0 and "conv layout SD" in out
    rows = [line.split()[0] for line in out.splitlines() if line.startswith("conv.x[row")]
    assert rows == ["conv.x[row"] * 5  # 4 - 1 + 2 rows
    rc, _, err = run(capsys, "layout", "minimax-text-01", "--tp", "1", "--conv-layout", "SD")
    assert rc == 2 and "no conv state" in err
    rc, _, err = run(capsys, "layout", "nemotron-h-8b", "--tp", "1", "--spec-tokens", "-1")
    assert rc == 2 and "--spec-tokens: must be >= 0, got -1" in err


def test_plan_falcon_h1_7b_4_to_6(capsys):
    rc, out, err = run(capsys, "plan", "falcon-h1-7b", "--src-tp", "4", "--dst-tp", "6")
    assert rc == 0 and err == ""
    spec = model("falcon-h1-7b")
    summary = table_rows(out, "dst rank")
    assert [int(r[0]) for r in summary] == list(range(6))
    for row in summary:
        dst_rank, num_reads, nbytes, content = (int(v) for v in row[:4])
        assert nbytes == content == page_layout(spec, 6, dst_rank).content_nbytes
        # 4 of the 24 heads per dst rank, 6 per src rank; B/C (1 group) come along
        heads = range(4 * dst_rank, 4 * dst_rank + 4)
        assert [int(v) for v in row[4:]] == sorted({h // 6 for h in heads})
    # every dst rank's read table adds up to its summary bytes
    tables = re.findall(r"dst rank (\d) of tp=6 <- src tp=4\n(.*?)\n(\d+) reads, (\d+) B",
                        out, re.S)
    assert len(tables) == 6
    for rank, body, num_reads, nbytes in tables:
        sizes = [int(line.split()[5]) for line in body.splitlines()[2:]]  # nbytes column
        assert len(sizes) == int(num_reads) == int(summary[int(rank)][1])
        assert sum(sizes) == int(nbytes) == page_layout(spec, 6, int(rank)).content_nbytes


def test_plan_one_rank_and_summary_only(capsys):
    rc, out, _ = run(capsys, "plan", "granite-4.0-h-tiny", "--src-tp", "1", "--dst-tp", "2",
                     "--rank", "1")
    assert rc == 0
    assert "dst rank 1 of tp=2" in out and "dst rank 0 of" not in out
    # vllm.md 4.1 with the preset's bf16 state (vLLM's default): P [9216, 19968) -> D [0, 10752)
    # and P [413184, 806400) -> D [10752, 403968)
    reads = table_rows(out, "src rank")
    assert [r[1:5] for r in reads] == [["[9216,", "19968)", "[0,", "10752)"],
                                       ["[413184,", "806400)", "[10752,", "403968)"]]
    rc, out, _ = run(capsys, "plan", "qwen3.5-0.8b", "--src-tp", "4", "--dst-tp", "2", "--summary")
    assert rc == 0 and "src bytes" not in out
    assert [r[4:] for r in table_rows(out, "dst rank")] == [["0", "1"], ["2", "3"]]


def test_plan_equal_tp_is_one_read_per_rank(capsys):
    rc, out, _ = run(capsys, "plan", "jamba-v0.1", "--src-tp", "2", "--dst-tp", "2")
    assert rc == 0
    assert [(r[0], r[1], r[4]) for r in table_rows(out, "dst rank")] == [("0", "1", "0"),
                                                                        ("1", "1", "1")]


@pytest.mark.parametrize("argv, message", [
    (("layout", "no-such-model", "--tp", "1"), "Unknown model 'no-such-model'"),
    (("layout", "falcon-h1-7b", "--tp", "16"), "24 heads"),
    (("layout", "falcon-h1-7b", "--tp", "2", "--rank", "2"), "rank"),
    (("plan", "falcon-h1-7b", "--src-tp", "4", "--dst-tp", "16"), "24 heads"),
    (("plan", "falcon-h1-7b", "--src-tp", "4", "--dst-tp", "2", "--rank", "5"), "rank"),
    (("layout", "missing/config.json", "--tp", "1"), "Cannot read the model config"),
])
def test_errors_exit_2_with_a_message(capsys, argv, message):
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and out == ""
    assert err.startswith(f"ssm-split {argv[0]}: error: ") and message in err


def test_model_from_a_config_file_or_directory(capsys, tmp_path):
    text = resources.files("ssm_split.specs").joinpath("data", "nemotron-h-8b.json").read_text("utf-8")
    config = {k: v for k, v in json.loads(text).items() if not k.startswith("_")}
    (tmp_path / "config.json").write_text(json.dumps(config))
    _, preset_out, _ = run(capsys, "layout", "nemotron-h-8b", "--tp", "2")
    for path in (tmp_path / "config.json", tmp_path):
        rc, out, err = run(capsys, "layout", str(path), "--tp", "2")
        assert rc == 0 and err == ""
        assert out.split("\n", 2)[2] == preset_out.split("\n", 2)[2]  # same page
        assert "24 of 52 layers" in out
    (tmp_path / "bad.json").write_text("{not json")
    rc, _, err = run(capsys, "plan", str(tmp_path / "bad.json"), "--src-tp", "1", "--dst-tp", "1")
    assert rc == 2 and "Cannot read the model config" in err
    (tmp_path / "llama.json").write_text(json.dumps({"model_type": "llama"}))
    rc, _, err = run(capsys, "layout", str(tmp_path / "llama.json"), "--tp", "1")
    assert rc == 2 and "Unsupported architecture" in err


def test_python_dash_m_models():
    result = subprocess.run([sys.executable, "-m", "ssm_split", "models"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "qwen3.5-27b" in result.stdout and "Qwen/Qwen3.5-27B" in result.stdout


@pytest.mark.parametrize("name, tp", [("granite-4.0-h-tiny", 4), ("qwen3.5-27b", 16),
                                      ("nemotron-h-8b", 16)])
def test_layout_unit_ranges_are_half_open_like_rank_units(capsys, name, tp):
    """issue 15: `layout` printed inclusive "0..7" where `UnitRange` is `[0, 8)`."""
    rc, out, _ = run(capsys, "layout", name, "--tp", str(tp), "--all-ranks")
    assert rc == 0 and "units and bytes are half-open ranges [start, stop)" in out
    pages = out.split("page of rank ")[1:]
    assert len(pages) == tp
    spec = model(name)
    for rank, page in enumerate(pages):
        units = {u.part: u for u in rank_units(spec, tp, rank)}
        rows = table_rows(page, "segment")
        shown = [(row[0], " ".join(row[1:3])) for row in rows]
        want = [(part, f"[{u.start}, {u.stop})" + ("*" if u.replicated else ""))
                for part, u in units.items()]
        assert shown == want
        assert ("* replicated" in page) == any(u.replicated for u in units.values())


@pytest.fixture
def nemotron_dir(tmp_path):
    text = resources.files("ssm_split.specs").joinpath("data", "nemotron-h-8b.json").read_text("utf-8")
    config = {k: v for k, v in json.loads(text).items() if not k.startswith("_")}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_every_command_accepts_the_four_model_forms(capsys, nemotron_dir):
    """issue 15: a preset name, an HF id, a config.json and its directory, everywhere."""
    forms = ["nemotron-h-8b", "nvidia/Nemotron-H-8B-Base-8K", str(nemotron_dir / "config.json"),
             str(nemotron_dir)]
    specs = set()
    for form in forms:
        rc, out, err = run(capsys, "layout", form, "--tp", "2", "--json")
        assert rc == 0, err
        specs.add(json.dumps(json.loads(out)["spec"]))
        rc, out, err = run(capsys, "plan", form, "--src-tp", "1", "--dst-tp", "2", "--json")
        assert rc == 0 and json.loads(out)["plans"][0]["reads"], err
        # demo and vllm-check resolve the model before refusing what does not fit it
        rc, _, err = run(capsys, "demo", "--model", form, "--layers", "25")
        assert rc == 2 and "has 24 state layers" in err
        rc, _, err = run(capsys, "vllm-check", form, "--src-tp", "1", "--dst-tp", "3")
        assert rc == 2 and "Cannot shard" in err and "num_groups=8" in err
    assert len(specs) == 1
