"""Training speed against Joey NMT 2.3.0 on the same machine, in interleaved rounds.

    python benchmarks/joeynmt_speed.py [--rounds 3] [--steps 50] [--data-dir data/multi30k]
                                       [--venv PATH] [--work DIR]
    python benchmarks/joeynmt_speed.py --quick        # a smoke run: 1 round of 15 steps

It measures the claim "our train.py trains at >= 5x Joey NMT's target tokens/s" instead
of quoting it, and prints:
  1. the machine (benchmarks/machine.py: CPU model, features, matmul peaks), and the
     versions of torch, Joey NMT and SentencePiece on each side;
  2. for every round, one line per run: target tokens/s after the warm-up steps, seconds
     a step, target tokens a step, and the share of the CPUs that other processes took
     meanwhile;
  3. a table of the rounds, the medians, the ratios ours/Joey for each of our runs, and
     a verdict line against >= 5x (on the first: train.py's default; fp32 beside it).

Each round runs, one after another, in fresh processes:
  * ours, as configured: ``python train.py`` with configs/multi30k.yaml as it is (3+3
    layers, d_model 256, joint SentencePiece unigram 8k sampled anew each epoch
    (data.sp_alpha), tied embeddings, dropout 0.1, Adam and the Noam schedule,
    4,096-token batches, its train.amp: a bf16 copy of the weights, bf16-weights), for
    --steps optimizer steps,
    with ``--set`` overrides that change only what happens around the steps:
    train.max_steps, train.log_every, train.device=cpu, no validation before the end
    (train.eval_every), no step-N.pt copies, greedy test scoring (decode.beam_size=1)
    and a run folder in the work folder;
  * ours, fp32: the same with train.amp=none (--amp picks other train.amp values, e.g.
    ``--amp bf16-weights bf16 none``; the verdict is on the first);
  * Joey NMT 2.3.0 on the CPU in fp32 (its only CPU mode: its ``fp16`` switch is turned
    off on the CPU, and it has no bf16): ``python -m joeynmt train CONFIG --skip-test`` in
    a venv of its own, with a config that matches ours (below).
Both sides run on the same torch (the version this project's venv has), with
OMP_NUM_THREADS set to --threads (default: every CPU), on the same Multi30k files.

How the speed is read. Each side reports its own figure every log interval (--log-every,
default 10 steps) over that interval: ours in its progress bar (``tok_s``: target tokens
of the interval over its seconds; the bar is drawn only on a terminal, so the runs are
given a pseudo-terminal), Joey NMT in its log line "Tokens per Sec" (``training.py``,
``_log_scores``: the target tokens of the interval, ``batch.ntokens`` = the non-padding
positions of the target shifted by one, i.e. the words and </s> without <s>, the same
count as ours, over the wall time since the last log line, validation time left out).
The first --warmup steps (default 10: the first interval, with the first steps' memory
allocation) are left out; a run's figure is the intervals after them, weighted by their
length as timed here on the arrival of each report: target tokens / seconds over steps
warmup+1 .. steps. Target tokens a step follow from that figure and the seconds.

Busy rounds. At the first and the last timed report the script reads /proc/stat (the
busy time of the CPUs this process may run on), the child's CPU time (/proc/PID/stat)
and its own; a run is flagged when the CPUs' busy time exceeds the child's (and this
script's) by more than --busy (default 10%) of wall time x CPUs. A round with a flagged
run is left out of the medians (and reported); if every round is flagged, the medians
use them all and the verdict says the figures are not to be trusted.

The Joey NMT venv (default ~/.cache/annotated-transformer/joeynmt-2.3.0, --venv PATH) is
built once and reused while its marker file says it is complete: ``python -m venv``,
then ``pip install torch==<ours>`` first (a bare ``torch`` from PyPI would bring GBs of
CUDA packages; --torch-index-url passes an index, e.g. PyTorch's CPU wheels, for that
one install), then ``pip install joeynmt==2.3.0 sentencepiece==0.1.99 importlib_metadata``
with a constraints file that pins torch, so pip cannot replace it. Joey NMT 2.3.0's own
requirements (protobuf<3.21, tensorboard, datasets, pylint, pytest, ...) resolve with
the pinned torch, so it installs with its dependencies (no --no-deps); importlib_metadata
is added because joeynmt/helpers.py imports it without declaring it. The build ends by
checking that ``python -m joeynmt --help`` runs. A failing step stops the script with the
command that failed and the end of its output.

The Joey NMT config (written to the work folder, --work DIR to keep it; else a
temporary folder, removed at the end), with the keys as Joey NMT 2.3.0's source reads
them (config.py, builders.py, model.py, tokenizers.py, vocabulary.py):
  * data: train.de/train.en and val.de/val.en (Multi30k, written as plain text: Joey
    NMT's plain dataset reads ``PREFIX.LANG``, not .gz), ``level: bpe`` with
    ``tokenizer_type: sentencepiece``, ``max_length: 100`` (ours: data.max_len 100), and
    one ``voc_file`` for both sides. The joint SentencePiece model is trained here, in
    Joey NMT's venv (sentencepiece 0.1.99), with our trainer settings (unigram, 8,000
    pieces, character coverage 1.0, byte fallback, 2 threads, on train.de then
    train.en) but Joey NMT's special ids (<unk> 0, <pad> 1, <s> 2, </s> 3); the vocab
    file is its pieces in id order. Without one shared voc_file Joey NMT builds a
    vocabulary per language and refuses to tie the embeddings.
  * model: ``encoder.type: transformer`` (Joey NMT's default encoder is recurrent), 3+3
    layers, 4 heads, hidden_size and embedding_dim 256, ff_size 1024, dropout 0.1 (also
    on the embeddings), scaled embeddings, ``layer_norm: pre`` on both sides (its
    decoder's default is post), tied_embeddings and tied_softmax: 7.58M parameters to
    our 7.59M.
  * training: Adam with betas (0.9, 0.98), ``scheduling: noam`` with factor 0.5 and 800
    warm-up steps (our peak of 1.1e-3), label smoothing 0.1, ``normalization: tokens``,
    ``batch_type: token`` with ``batch_size: 4096``, ``updates`` = --steps,
    ``logging_freq`` = --log-every, ``validation_freq`` a multiple of it beyond the run
    (it must be one), ``use_cuda: false``, ``fp16: false``, and
    ``learning_rate_min: 1.0e-12``: Joey NMT stops training as soon as a logged learning
    rate is below learning_rate_min (default 1e-4), which the Noam warm-up is at every
    step before the 73rd here. ``--skip-test``: after training Joey NMT would otherwise
    load best.ckpt, which no validation has written.

What differs, and counts in the figures as each project ships it: Joey NMT's batches
of 4,096 tokens are drawn at random (its TokenBatchSampler counts sentences x
(longest of either side + 1), no bucketing, and closes a batch once it reaches 4,096),
so they hold more padding and fewer target tokens than ours, which are planned from
length-sorted sentences (sentences x longest <= 4,096); Joey NMT tokenizes each sentence
as its batches are drawn, we read a corpus encoded once (data/prepared) and sample each
epoch's segmentation from it (about 3% more tokens a sentence, each counted); Joey NMT
computes the output layer, the log-softmax and its smoothed loss (KL divergence against a
dense positions x 8,000 target distribution) over the padding positions too. The
target-tokens-a-step column shows how much of a ratio comes from the batches and how
much from the seconds a step. Run it on an idle machine: a default run (3 rounds of 50
steps) takes about 15 minutes on 2 cores, half of it Joey NMT's steps (a round: about
1 minute for each of our runs, with their start and their closing validation and test
decoding, and 2-3 minutes for Joey NMT's); building the venv adds about a minute the
first time. --quick takes about 3 minutes.
"""

from __future__ import annotations

import argparse
import codecs
import fcntl
import json
import os
import pty
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from machine import describe  # noqa: E402

from transformer.config import load_config  # noqa: E402
from transformer.data.files import read_lines  # noqa: E402
from transformer.data.multi30k import ensure_multi30k, resolve_data_dir  # noqa: E402

JOEY = "joeynmt==2.3.0"
PACKAGES = [JOEY, "sentencepiece==0.1.99", "importlib_metadata"]
DEFAULT_VENV = Path("~/.cache/annotated-transformer/joeynmt-2.3.0")
MARKER = ".annotated-transformer-joeynmt.json"  # written last: the venv is complete
TARGET = 5.0  # the claim: ours >= 5x Joey NMT's target tokens/s
LANGS = ("de", "en")


class Failure(Exception):
    """A step that could not be done; main() prints it and exits with 1."""


# --------------------------------------------------------------------------- the venv


def run_checked(cmd: list[str], what: str, **kwargs) -> str:
    """Run ``cmd``, returning its output; raise Failure naming the command if it fails."""
    try:
        result = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)
    except OSError as e:
        raise Failure(f"{what}: could not run {' '.join(cmd)}: {e}") from e
    if result.returncode != 0:
        tail = "\n".join(result.stdout.strip().splitlines()[-25:])
        raise Failure(f"{what}: `{' '.join(cmd)}` exited with {result.returncode}; its last lines:\n{tail}")
    return result.stdout


def ensure_venv(venv: Path, torch_spec: str, torch_index: str | None, rebuild: bool) -> Path:
    """The Joey NMT venv's python, after building the venv unless it is complete already."""
    python = venv / "bin" / "python"
    wanted = {"torch": torch_spec, "packages": PACKAGES}
    marker = venv / MARKER
    if not rebuild and marker.is_file() and python.exists():
        try:
            complete = json.loads(marker.read_text()) == wanted
        except (OSError, ValueError):
            complete = False
        if complete:
            run_checked([str(python), "-m", "joeynmt", "--help"], f"checking the Joey NMT venv {venv}")
            print(f"Joey NMT venv: {venv} (reused)")
            return python
    print(f"Joey NMT venv: building {venv} (downloads packages the first time; about a minute)", flush=True)
    marker.unlink(missing_ok=True)
    what = f"building the Joey NMT venv {venv}"
    venv.parent.mkdir(parents=True, exist_ok=True)
    run_checked([sys.executable, "-m", "venv", str(venv)], what)
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
    index = ["--index-url", torch_index] if torch_index else []
    run_checked(pip + index + [torch_spec], what)  # first, alone: nothing else picks torch's build
    constraints = venv / "torch-constraints.txt"
    constraints.write_text(torch_spec + "\n")
    run_checked(pip + ["-c", str(constraints)] + PACKAGES, what)
    run_checked([str(python), "-m", "joeynmt", "--help"], f"{what}: checking that Joey NMT runs")
    marker.write_text(json.dumps(wanted))
    return python


VERSIONS = """
import json, importlib_metadata as m, sentencepiece, torch
print(json.dumps({"torch": torch.__version__, "joeynmt": m.version("joeynmt"),
                  "sentencepiece": sentencepiece.__version__, "threads": torch.get_num_threads(),
                  "kernels": torch.backends.cpu.get_cpu_capability()}))
"""


def joey_versions(python: Path, env: dict[str, str]) -> dict:
    out = run_checked([str(python), "-c", VERSIONS], "reading the Joey NMT venv's versions", env=env)
    return json.loads(out.strip().splitlines()[-1])


# ---------------------------------------------------------------- Joey NMT's inputs

SENTENCEPIECE = """
import sys, sentencepiece as spm
text, prefix, vocab = sys.argv[1:]
spm.SentencePieceTrainer.train(
    input=text, model_prefix=prefix, vocab_size=8000, model_type="unigram", character_coverage=1.0,
    byte_fallback=True, unk_id=0, pad_id=1, bos_id=2, eos_id=3, unk_piece="<unk>", pad_piece="<pad>",
    bos_piece="<s>", eos_piece="</s>", num_threads=2, minloglevel=2)
with open(prefix + ".vocab", encoding="utf-8") as f, open(vocab, "w", encoding="utf-8") as out:
    for line in f:
        out.write(line.split("\\t")[0] + "\\n")
"""


def write_joey_inputs(work: Path, data: Path, python: Path, env: dict[str, str]) -> None:
    """Multi30k train/val as plain text, the joint SentencePiece model and its vocab file."""
    for split in ("train", "val"):
        for lang in LANGS:
            # One line per pair: Joey NMT reads with str.splitlines, which would also
            # split at U+2028 and the like (none in Multi30k; replaced, to be sure).
            lines = [" ".join(line.splitlines()) for line in read_lines(data / f"{split}.{lang}.gz")]
            (work / f"{split}.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    joint = work / "sp_input.txt"
    joint.write_text("".join((work / f"train.{lang}").read_text(encoding="utf-8") for lang in LANGS), encoding="utf-8")
    run_checked([str(python), "-c", SENTENCEPIECE, str(joint), str(work / "spm"), str(work / "vocab.txt")],
                "training Joey NMT's SentencePiece model", env=env)


def joey_config(work: Path, model_dir: Path, steps: int, log_every: int) -> dict:
    def side(lang: str) -> dict:
        return {"lang": lang, "level": "bpe", "lowercase": False, "max_length": 100,
                "voc_file": str(work / "vocab.txt"), "tokenizer_type": "sentencepiece",
                "tokenizer_cfg": {"model_file": str(work / "spm.model")}}

    def stack() -> dict:
        return {"type": "transformer", "num_layers": 3, "num_heads": 4, "hidden_size": 256, "ff_size": 1024,
                "dropout": 0.1, "layer_norm": "pre",
                "embeddings": {"embedding_dim": 256, "scale": True, "dropout": 0.1}}

    return {
        "name": "joeynmt_speed", "joeynmt_version": "2.3.0", "model_dir": str(model_dir),
        "use_cuda": False, "fp16": False, "random_seed": 42,
        "data": {"train": str(work / "train"), "dev": str(work / "val"), "dataset_type": "plain",
                 "src": side("de"), "trg": side("en")},
        "training": {
            "optimizer": "adam", "adam_betas": [0.9, 0.98], "scheduling": "noam", "learning_rate_factor": 0.5,
            "learning_rate_warmup": 800, "learning_rate_min": 1.0e-12, "loss": "crossentropy",
            "label_smoothing": 0.1, "normalization": "tokens", "batch_size": 4096, "batch_type": "token",
            "updates": steps, "epochs": 100, "logging_freq": log_every,
            "validation_freq": log_every * (steps // log_every + 1000), "keep_best_ckpts": 1, "overwrite": True,
            "shuffle": True, "num_workers": 0,
        },
        "testing": {"beam_size": 1, "batch_size": 64, "eval_metrics": ["bleu"]},
        "model": {"initializer": "xavier_uniform", "embed_initializer": "xavier_uniform", "tied_embeddings": True,
                  "tied_softmax": True, "encoder": stack(), "decoder": stack()},
    }


# ------------------------------------------------------------------- CPU accounting

TICK = os.sysconf("SC_CLK_TCK")


def machine_busy_s(cpus: set[int]) -> float:
    """Seconds the CPUs in ``cpus`` have spent busy (not idle, not waiting for I/O), steal included."""
    total = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            # user nice system idle iowait irq softirq steal (guest time is inside user)
            v = [int(x) for x in values[:8]] + [0] * max(0, 8 - len(values))
            total += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
    return total / TICK


def process_cpu_s(pid: int) -> float:
    """CPU seconds of process ``pid`` (all its threads, and the children it has waited for)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return sum(int(x) for x in fields[11:15]) / TICK  # utime stime cutime cstime


def self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


@dataclass
class Sample:
    wall: float
    busy: float
    child: float
    me: float


def sample(pid: int, cpus: set[int]) -> Sample:
    return Sample(time.perf_counter(), machine_busy_s(cpus), process_cpu_s(pid), self_cpu_s())


# ------------------------------------------------------------ the speed reports


class OursReports:
    """Our progress bar's figures: ``N/TOTAL [..., loss=..., lr=..., tok_s=...]``, set after
    step N for every N that is a multiple of train.log_every. The bar is also redrawn
    after every step with the postfix it has, so a report is a multiple of the interval
    drawn with a postfix it did not have before (the learning rate changes every step)."""

    BAR = re.compile(r"(\d+)/\S+ \[[^\]]*?(loss=[^\]]*?tok_s=(\d+))\]")

    def __init__(self, log_every: int):
        self.log_every, self.last = log_every, None

    def __call__(self, segment: str) -> tuple[int, float] | None:
        m = self.BAR.search(segment)
        if not m or int(m[1]) % self.log_every or m[2] == self.last:
            return None
        self.last = m[2]
        return int(m[1]), float(m[3])


class JoeyReports:
    """Joey NMT's log line every logging_freq steps: ``Step: N, ..., Tokens per Sec: R, Lr: ...``."""

    LINE = re.compile(r"Step:\s+(\d+),.*Tokens per Sec:\s+(\d+), Lr")

    def __call__(self, segment: str) -> tuple[int, float] | None:
        m = self.LINE.search(segment)
        return (int(m[1]), float(m[2])) if m else None


@dataclass
class Run:
    label: str
    reports: dict[int, tuple[float, float]] = field(default_factory=dict)  # step -> (tokens/s, arrival)
    start: Sample | None = None
    end: Sample | None = None
    wall: float = 0.0  # the whole process, start-up and wind-down included

    def figures(self, warmup: int, steps: int, log_every: int, cpus: int) -> dict[str, float]:
        """Tokens/s over steps warmup+1..steps (intervals weighted by their seconds), seconds
        and target tokens a step, and the share of the CPUs others took meanwhile."""
        tokens = seconds = 0.0
        for k in range(warmup + log_every, steps + 1, log_every):
            rate, t = self.reports[k]
            d = t - self.reports[k - log_every][1]
            tokens, seconds = tokens + rate * d, seconds + d
        window = self.end.wall - self.start.wall
        others = (self.end.busy - self.start.busy) - (self.end.child - self.start.child) - (self.end.me - self.start.me)
        return {"tok_s": tokens / seconds, "s_step": seconds / (steps - warmup),
                "tok_step": tokens / (steps - warmup), "others": max(0.0, others) / (window * cpus)}


def run_streamed(label: str, cmd: list[str], env: dict[str, str], log_path: Path, parse, warmup: int, steps: int,
                 log_every: int, cpus: set[int]) -> Run:
    """Run ``cmd`` on a pseudo-terminal, timing each speed report as it arrives and reading
    the CPU counters at the first (step ``warmup``) and last (step ``steps``) timed ones."""
    master, slave = pty.openpty()
    # Wide, so that the progress bar never cuts its postfix short.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 400, 0, 0))
    run = Run(label)
    begin = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                            start_new_session=True)
    os.close(slave)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    tail = ""
    try:
        with log_path.open("wb") as log:
            while True:
                try:
                    chunk = os.read(master, 1 << 16)
                except OSError:  # EIO: every holder of the terminal's other end has closed it
                    break
                if not chunk:
                    break
                now = time.perf_counter()
                log.write(chunk)
                *done, tail = re.split(r"[\r\n]", tail + decoder.decode(chunk))
                for segment in done + [tail]:  # the unfinished last segment too: a report ends in "]" or "Lr"
                    report = parse(segment)
                    if report is None or report[0] in run.reports:
                        continue
                    step, rate = report
                    run.reports[step] = (rate, now)
                    if step in (warmup, steps):
                        try:
                            s = sample(proc.pid, cpus)
                        except OSError:  # the child is gone already
                            s = None
                        if step == warmup:
                            run.start = s
                        else:
                            run.end = s
    finally:
        if proc.poll() is None:
            proc.kill()
        rc = proc.wait()
        os.close(master)
    run.wall = time.perf_counter() - begin
    wanted = range(warmup, steps + 1, log_every)
    if rc != 0 or any(k not in run.reports for k in wanted) or run.start is None or run.end is None:
        text = log_path.read_text(encoding="utf-8", errors="replace").replace("\r", "\n")
        last = "\n".join(line for line in text.splitlines() if line.strip())
        last = "\n".join(last.splitlines()[-25:])
        missing = [k for k in wanted if k not in run.reports]
        raise Failure(f"{label}: `{' '.join(cmd)}` exited with {rc}"
                      + (f", without speed reports for steps {missing}" if missing else "")
                      + f"; its last lines:\n{last}")
    return run


# ----------------------------------------------------------------------------- main


def ours_command(data: Path, run_dir: Path, amp: str, steps: int, log_every: int) -> list[str]:
    sets = [f"train.max_steps={steps}", f"train.amp={amp}", f"train.log_every={log_every}", "train.device=cpu",
            f"train.eval_every={10**9}", "train.keep_checkpoints=0", "decode.beam_size=1", f"train.run_dir={run_dir}"]
    return [sys.executable, str(ROOT / "train.py"), "--data-dir", str(data)] + [a for s in sets for a in ("--set", s)]


def fmt_ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the three runs (default 3)")
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps of every run (default 50)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="first steps left out of the timing, a multiple of --log-every (default: one interval)")
    parser.add_argument("--log-every", type=int, default=None,
                        help="steps between speed reports, both sides (default 10; 5 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 round of 15 steps, reports every 5")
    parser.add_argument("--data-dir", default=None, help="the Multi30k folder (default: as train.py finds it)")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV,
                        help=f"the Joey NMT venv, built if missing or incomplete (default {DEFAULT_VENV})")
    parser.add_argument("--rebuild-venv", action="store_true", help="build the Joey NMT venv again")
    parser.add_argument("--torch", default=None,
                        help="the torch requirement of the Joey NMT venv (default: torch==<this venv's version>)")
    parser.add_argument("--torch-index-url", default=None,
                        help="pip index for that torch install only (e.g. PyTorch's CPU wheel index)")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep the Joey NMT inputs, configs, run folders and logs here (default: a temporary "
                        "folder, removed at the end)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="OMP_NUM_THREADS of both sides (default: every CPU)")
    parser.add_argument("--busy", type=float, default=0.10,
                        help="flag a run when others took more than this share of the CPUs (default 0.10)")
    parser.add_argument("--amp", nargs="+", default=None, choices=["none", "bf16", "bf16-weights"],
                        help="train.amp of our runs; the verdict is on the first (default: the default config's, "
                             "then none)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps = 1, 15
        args.log_every = args.log_every or 5
    args.log_every = args.log_every or 10
    args.warmup = args.log_every if args.warmup is None else args.warmup
    if args.steps % args.log_every or args.warmup % args.log_every or not 0 < args.warmup < args.steps:
        parser.error("--steps and --warmup must be multiples of --log-every, with 0 < --warmup < --steps")

    try:
        return measure(args)
    except Failure as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def measure(args: argparse.Namespace) -> int:
    data = ensure_multi30k(resolve_data_dir(args.data_dir))
    cpus = os.sched_getaffinity(0)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    torch_spec = args.torch or f"torch=={torch.__version__.split('+')[0]}"

    ours = args.amp or list(dict.fromkeys([load_config(ROOT / "configs" / "multi30k.yaml").train.amp, "none"]))
    describe("cpu")
    python = ensure_venv(args.venv.expanduser(), torch_spec, args.torch_index_url, args.rebuild_venv)
    joey = joey_versions(python, env)
    print(f"ours: torch {torch.__version__}, {args.threads} threads (OMP_NUM_THREADS); "
          f"Joey NMT {joey['joeynmt']}: torch {joey['torch']} ({joey['kernels']}), {joey['threads']} threads, "
          f"sentencepiece {joey['sentencepiece']}")
    if joey["torch"].split("+")[0] != torch.__version__.split("+")[0]:
        print(f"warning: the two sides run different torch versions ({torch.__version__} and {joey['torch']})")

    keep = args.work is not None
    work = args.work.expanduser().resolve() if keep else Path(tempfile.mkdtemp(prefix="joeynmt-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        write_joey_inputs(work, data, python, env)
        print(f"data: {data}; work folder: {work}{'' if keep else ' (temporary)'}")
        print(f"{args.rounds} round(s) of {args.steps} steps each; tokens/s over steps {args.warmup + 1}-{args.steps} "
              f"(reports every {args.log_every}); a run is flagged when other processes took > {args.busy:.0%} "
              f"of the {len(cpus)} CPUs\n", flush=True)

        kinds = [f"ours {amp}" for amp in ours] + ["Joey NMT fp32"]
        results: list[dict[str, dict[str, float]]] = []
        for r in range(1, args.rounds + 1):
            row = {}
            for kind in kinds:
                name = kind.split()[0].lower() + ("-" + kind.split()[-1] if kind.startswith("ours") else "")
                run_dir = work / f"{name}-r{r}"
                if kind.startswith("ours"):
                    cmd = ours_command(data, run_dir, kind.split()[-1], args.steps, args.log_every)
                    parse = OursReports(args.log_every)
                else:
                    config = work / f"{name}-r{r}.yaml"
                    config.write_text(yaml.safe_dump(joey_config(work, run_dir, args.steps, args.log_every),
                                                     sort_keys=False))
                    cmd = [str(python), "-m", "joeynmt", "train", str(config), "--skip-test"]
                    parse = JoeyReports()
                run = run_streamed(kind, cmd, env, work / f"{name}-r{r}.log", parse, args.warmup, args.steps,
                                   args.log_every, cpus)
                f = run.figures(args.warmup, args.steps, args.log_every, len(cpus))
                f["flagged"] = f["others"] > args.busy
                row[kind] = f
                print(f"round {r}/{args.rounds}  {kind:<14} {f['tok_s']:7,.0f} tok/s  {f['s_step']:6.2f} s/step  "
                      f"{f['tok_step']:6,.0f} tok/step  others {f['others']:4.0%} of the CPUs"
                      f"{' (flagged)' if f['flagged'] else ''}  ({run.wall:.0f} s in all)", flush=True)
            results.append(row)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)

    clean = [i for i, row in enumerate(results) if not any(f["flagged"] for f in row.values())]
    used = clean or list(range(len(results)))
    print(f"\ntarget tokens/s over steps {args.warmup + 1}-{args.steps} "
          "(* = other processes took CPU: left out of the medians)")
    header = "".join(f"{f'round {i + 1}':>10}" for i in range(len(results)))
    print(f"{'':<20}{header}{'median':>10}{'tok/step':>10}")
    medians, per_step = {}, {}
    for kind in kinds:
        medians[kind] = statistics.median(results[i][kind]["tok_s"] for i in used)
        per_step[kind] = statistics.median(results[i][kind]["tok_step"] for i in used)
        cells = "".join(f"{row[kind]['tok_s']:>9,.0f}{'*' if row[kind]['flagged'] else ' '}" for row in results)
        print(f"{kind:<20}{cells}{medians[kind]:>10,.0f}{per_step[kind]:>10,.0f}")
    joey_kind = kinds[-1]
    for kind in kinds[:-1]:
        cells = "".join(f"{fmt_ratio(row[kind]['tok_s'], row[joey_kind]['tok_s']):>9}"
                        f"{'*' if i not in clean else ' '}" for i, row in enumerate(results))
        print(f"{kind + ' / Joey':<20}{cells}{fmt_ratio(medians[kind], medians[joey_kind]):>10}")
    ratio = medians[f"ours {ours[0]}"] / medians[joey_kind]
    fp32 = f"; fp32: {medians['ours none'] / medians[joey_kind]:.2f}x" if "ours none" in medians else ""
    skipped = len(results) - len(clean)
    if skipped:
        print(f"{skipped} of {len(results)} round(s) left out: other processes took CPU during them")
    how = f"{len(clean)} clean round(s)" if clean else "no clean round: the figures are not to be trusted"
    verdict = "holds" if ratio >= TARGET else "does not hold"
    print(f"verdict: train.py (train.amp {ours[0]}) trains at {ratio:.2f}x Joey NMT's target tokens/s{fp32}: "
          f"the claim >= {TARGET:g}x {verdict} ({how}; medians of {args.steps} steps a run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
