"""Bad arguments, one class of mistake per case, for every subcommand.

Each case is the argv and a phrase its one-line error must contain. The contract
(docs/cli.md): exit status 2, nothing on stdout, exactly one line on stderr starting
`ssm-split <command>: error: `, no traceback. `test_errors.py` runs every case; to cover a
new subcommand (e.g. `bench`), add its list to `CASES` (with `subprocess=True` when the
command starts processes or its failure could come from one).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Bad:
    argv: tuple[str, ...]
    phrase: str
    subprocess: bool = False  # run as `python -m ssm_split` (catches children's output)
    needs: tuple[str, ...] = field(default=())  # modules the case needs (else skipped)

    @property
    def id(self) -> str:
        return " ".join(self.argv)


def bad(*argv: str, phrase: str, subprocess: bool = False, needs: tuple[str, ...] = ()) -> Bad:
    return Bad(tuple(argv), phrase, subprocess, needs)


# `{tmp}` in an argument is replaced by a scratch directory holding `empty/` (no
# config.json), `bad.json` (not JSON), `list.json` (a JSON list) and `llama.json`
# (an unsupported architecture).
CASES: dict[str, list[Bad]] = {
    "": [
        bad(phrase="the following arguments are required: COMMAND"),
        bad("bogus", phrase="invalid choice: 'bogus'"),
    ],
    "models": [
        bad("models", "--tp", "0", phrase="argument --tp: must be >= 1, got 0"),
        bad("models", "--tp", "-2", phrase="argument --tp: must be >= 1, got -2"),
        bad("models", "--tp", "two", phrase="expected a whole number >= 1, got 'two'"),
        bad("models", "--bogus", phrase="unrecognized arguments: --bogus"),
    ],
    "layout": [
        bad("layout", "qwen3.5-4b", phrase="the following arguments are required: --tp"),
        bad("layout", "qwen3.5-4b", "--tp", "0", phrase="argument --tp: must be >= 1"),
        bad("layout", "qwen3.5-4b", "--tp", "3", phrase="Pick a TP size from [1, 2, 4, 8, 16, 32]."),
        bad("layout", "falcon-h1-7b", "--tp", "16", phrase="it has 24 heads"),
        bad("layout", "falcon-h1-7b", "--tp", "2", "--rank", "2",
            phrase="--rank 2 is not a rank of --tp 2: ranks are [0, 2), so pass --rank 1 or less"),
        bad("layout", "falcon-h1-7b", "--tp", "2", "--rank", "-1", phrase="argument --rank: must be >= 0"),
        bad("layout", "falcon-h1-7b", "--tp", "2", "--rank", "1", "--all-ranks",
            phrase="not allowed with argument --rank"),
        bad("layout", "no-such-model", "--tp", "1",
            phrase="or give the path of a model's config.json or of the directory holding it"),
        bad("layout", "{tmp}/empty", "--tp", "1", phrase="has no config.json"),
        bad("layout", "{tmp}/missing/config.json", "--tp", "1",
            phrase="Cannot read the model config"),
        bad("layout", "{tmp}/bad.json", "--tp", "1", phrase="Cannot read the model config"),
        bad("layout", "{tmp}/list.json", "--tp", "1", phrase="holds a JSON list, not an object"),
        bad("layout", "{tmp}/llama.json", "--tp", "1", phrase="Unsupported architecture"),
        bad("layout", "nemotron-h-8b", "--tp", "1", "--conv-layout", "XY",
            phrase="argument --conv-layout: invalid choice: 'XY'"),
        bad("layout", "nemotron-h-8b", "--tp", "1", "--spec-tokens", "-1",
            phrase="argument --spec-tokens: must be >= 0, got -1"),
        bad("layout", "minimax-text-01", "--tp", "1", "--conv-layout", "SD",
            phrase="has no conv state"),
    ],
    "plan": [
        bad("plan", "falcon-h1-7b", "--src-tp", "4", phrase="required: --dst-tp"),
        bad("plan", "falcon-h1-7b", "--src-tp", "0", "--dst-tp", "2", phrase="--src-tp: must be >= 1"),
        bad("plan", "falcon-h1-7b", "--src-tp", "4", "--dst-tp", "16",
            phrase="Pick a TP size from [1, 2, 3, 4, 6, 8, 12, 24]."),
        bad("plan", "falcon-h1-7b", "--src-tp", "4", "--dst-tp", "2", "--rank", "5",
            phrase="--rank 5 is not a rank of --dst-tp 2"),
        bad("plan", "Org/No-Such-Model", "--src-tp", "1", "--dst-tp", "2", phrase="Unknown model"),
    ],
    "demo": [
        bad("demo", "--device", "cuda", phrase="--device cuda needs", subprocess=True,
            needs=("nixl",)),
        bad("demo", "--timeout", "0", phrase="argument --timeout: must be a number of seconds > 0"),
        bad("demo", "--timeout", "-5", phrase="argument --timeout: must be a number of seconds > 0"),
        bad("demo", "--timeout", "soon", phrase="expected seconds"),
        bad("demo", "--timeout", "0.001", phrase="give them more time with --timeout",
            subprocess=True, needs=("nixl",)),
        bad("demo", "--requests", "0", phrase="argument --requests: must be >= 1"),
        bad("demo", "--layers", "0", phrase="argument --layers: must be >= 1"),
        bad("demo", "--batch", "0", phrase="argument --batch: must be >= 1"),
        bad("demo", "--src-tp", "0", phrase="argument --src-tp: must be >= 1"),
        bad("demo", "--order", "random", phrase="argument --order: invalid choice"),
        bad("demo", "--strategy", "teleport", phrase="argument --strategy: invalid choice"),
        bad("demo", "--strategy", "peer", phrase="--strategy peer maps GPU memory"),
        bad("demo", "--dst-devices", "1,x", phrase="expected comma-separated GPU numbers"),
        bad("demo", "--model", "qwen3.5-0.8b", "--layers", "19",
            phrase="has 18 state layers; pass --layers 18 or fewer"),
        bad("demo", "--dst-tp", "5", phrase="Pick a TP size from"),
        bad("demo", "--model", "nope", phrase="Unknown model 'nope'"),
        bad("demo", "--model", "qwen3.5-27b", "--src-tp", "2", "--dst-tp", "4", "--requests",
            "64", "--layers", "8", phrase="pass --requests 44 or fewer at --layers 8"),
        bad("demo", "--model", "nemotron-h-56b", "--requests", "100000", "--layers", "54",
            phrase="pass --layers 20 or fewer (with --requests 1)"),
    ],
    "vllm-check": [
        bad("vllm-check", "granite-4.0-h-tiny", "--src-tp", "1", phrase="required: --dst-tp"),
        bad("vllm-check", "no-such-model", "--src-tp", "1", "--dst-tp", "2",
            phrase="Unknown model 'no-such-model'"),
        bad("vllm-check", "{tmp}/empty", "--src-tp", "1", "--dst-tp", "2",
            phrase="has no config.json"),
    ],
    "bench": [
        bad("bench", "--device", "cpu", "--strategies", "bogus", phrase="unknown strategies ['bogus']"),
        bad("bench", "--device", "cpu", "--layers", "0", phrase="argument --layers: must be >= 1"),
        bad("bench", "--device", "cpu", "--layers", "49", phrase="qwen3.5-27b has 48 state layers"),
        bad("bench", "--device", "cpu", "--batch", "0", phrase="--batch must be >= 1 request"),
        bad("bench", "--device", "cpu", "--batch", "2,x", phrase="expected comma-separated whole numbers"),
        bad("bench", "--device", "cpu", "--batch", "16", "--blocks", "8", phrase="use --blocks 16 or more"),
        bad("bench", "--device", "cpu", "--repeats", "0", phrase="argument --repeats: must be >= 1"),
        bad("bench", "--device", "cpu", "--warmup", "-1", phrase="argument --warmup: must be >= 0"),
        bad("bench", "--device", "cpu", "--dst-tp", "5", phrase="Pick a TP size from"),
        bad("bench", "--device", "cpu", "--model", "{tmp}/empty", phrase="has no config.json"),
        bad("bench", "--device", "gpu", phrase="argument --device: invalid choice"),
        bad("bench", "--src-devices", "0,a", phrase="expected comma-separated whole numbers"),
        bad("bench", "--model", "qwen3.5-0.8b", phrase="--device cuda needs a CUDA GPU", needs=("torch",)),
    ],
}
