"""What several test modules build alike: small MLPs, a quadratic model, idx files, the CLI words and run
settings of smoke-sized runs. Fixtures are in conftest.py; test modules import these as `from helpers import
...` (pytest puts tests/ on sys.path)."""

import gzip
import io
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gvr_lab import create_method

REPO = Path(__file__).parent.parent

# A seconds-long run: the synthetic dataset on a subset, tiny_cnn, no progress bar (Config's fields).
TINY_RUN = dict(
    dataset="synthetic",
    model="tiny_cnn",
    epochs=2,
    batch_size=64,
    lr=0.05,
    train_subset=512,
    device="cpu",
    progress=False,
)

# `gvr-lab bench` at smoke size on the CPU: two timed rounds of two steps after one warm-up step.
BENCH_SMOKE = [
    "bench",
    "--model",
    "tiny_cnn",
    "--shape",
    "1x28",
    "--batch-size",
    "16",
    "--steps",
    "2",
    "--warmup",
    "1",
    "--rounds",
    "2",
    "--device",
    "cpu",
]

# The logged norm of the gradient the optimizer applies, by method (vSAM logs ||g|| at w only).
UPDATE_NORM = {
    "sam": "sam_grad_norm",
    "asam": "sam_grad_norm",
    "looksam": "sam_grad_norm",
    "esam": "sam_grad_norm",
    "vsam": None,
}


def mlp(*widths: int, seed: int = 0, bn: bool = False, dropout: float | None = None, activation=nn.Tanh):
    """nn.Sequential of Linear layers through `widths` (inputs, hidden..., outputs) with an activation
    between each two, its weights drawn after torch.manual_seed(seed). In the first hidden layer only:
    bn puts a BatchNorm1d between the Linear and its activation, dropout a Dropout of that p after the
    activation (None: no Dropout layer)."""
    torch.manual_seed(seed)
    *hidden, last = zip(widths, widths[1:])
    layers = []
    for i, (n_in, n_out) in enumerate(hidden):
        layers.append(nn.Linear(n_in, n_out))
        if bn and i == 0:
            layers.append(nn.BatchNorm1d(n_out))
        layers.append(activation())
        if dropout is not None and i == 0:
            layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(*last))


class Quadratic(nn.Module):
    """L(w) = 1/2 (w - w*)^T A (w - w*) as a model: the 'logits' are w repeated per row, `sample_losses`
    gives L for each row and `loss` their mean (what a method uses in place of cross-entropy)."""

    def __init__(self, a, w_star, w0):
        super().__init__()
        self.a, self.w_star = a, w_star
        self.w = nn.Parameter(w0.clone())

    def forward(self, x):
        return self.w.expand(x.shape[0], -1)

    def sample_losses(self, logits, y):
        d = logits - self.w_star
        return 0.5 * ((d @ self.a) * d).sum(1)

    def loss(self, logits, y):
        return self.sample_losses(logits, y).mean()


def quadratic_method(name, a, w_star, w0, lr=0.1, **hp):
    """(Quadratic model from w0, the method `name` minimizing its L with plain SGD at lr)."""
    model = Quadratic(a, w_star, w0)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    method = create_method(name, model, opt, **hp)
    method.loss = model.loss
    if hasattr(method, "sample_losses"):
        method.sample_losses = model.sample_losses
    return model, method


def checkpoint_round_trip(*states):
    """`states` as torch.load(weights_only=True) gives them back after torch.save (in memory)."""
    buf = io.BytesIO()
    torch.save(states, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def write_idx(path: Path, array: np.ndarray, truncate: int = 0) -> None:
    """An idx file (MNIST's format) of `array` as uint8: magic with the uint8 code and the number of
    dimensions, the sizes big-endian, the bytes, less the last `truncate` (a cut-off file); gzip
    compressed where the name ends in .gz."""
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    with (gzip.open if path.suffix == ".gz" else open)(path, "wb") as f:
        f.write(data[: len(data) - truncate])


def lock_holder(lock: Path) -> int | None:
    """The process that has a run's .lock open: the worker (or Ray task) training it."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if any(os.readlink(fd) == str(lock) for fd in (proc / "fd").iterdir()):
                return int(proc.name)
        except OSError:
            continue
    return None


def gvr_lab_process(args: list[str], cwd, pythonpath=(), check: bool = True) -> subprocess.CompletedProcess:
    """`gvr-lab ARGS` as a child process in `cwd`, offline, with the folders `pythonpath` first on
    its path and then this checkout (whose package it runs unless one of them holds another);
    checked to exit 0 unless `check` is False."""
    path = os.pathsep.join([*map(str, pythonpath), str(REPO)])
    env = {**os.environ, "PYTHONPATH": path, "GVR_LAB_OFFLINE": "1"}
    gvr_lab = str(Path(sys.executable).parent / "gvr-lab")
    done = subprocess.run([gvr_lab, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, f"gvr-lab {' '.join(args)}\n{done.stdout}\n{done.stderr}"
    return done


def install_package(root: Path, name: str, files: dict[str, str], entry_points: dict[str, dict[str, str]]) -> None:
    """A package installed into the folder `root` as pip would install it: its files (path relative
    to root -> text) and `<name>-0.1.dist-info` with METADATA and entry_points.txt (group -> {entry
    name: module}), which importlib.metadata finds wherever `root` is on the path."""
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    info = root / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    groups = [
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items()) for group, entries in entry_points.items()
    ]
    (info / "entry_points.txt").write_text("\n".join(groups))


def check_claims_recompute(records: list[dict], seeds, protocol) -> None:
    """What a reader of a claims study can check from its seeds.csv (`seeds`) and its protocol alone:
    every claim tested as registered (its family, test, direction and margin, on its registered n);
    its n, mean paired difference, CI and p (claims.recompute); Holm's adjustment over the primary
    family (a primary claim without a p counts as p = 1, a secondary one keeps its own p); each
    claim's own verdict from its adjusted p and interval; its verdict, which stands only where its
    premise holds."""
    import math

    import pytest

    from gvr_lab import claims, stats

    assert [r["id"] for r in records] == [c["id"] for c in protocol.claims]
    for record, claim in zip(records, protocol.claims):  # tested as registered, on the registered n
        registered = stats.Claim(**claims.definition(claim))
        for field in ("statement", "family", "test", "direction", "margin", "metric"):
            assert record[field] == getattr(registered, field), (record["id"], field)
        assert record["protocol_sha256"] == protocol.sha256 and record["n"] == protocol.n(record["id"])
        n, mean, low, high, p = claims.recompute(seeds, record, protocol.alpha)
        assert n == record["n"] and mean == pytest.approx(record["diff_mean"], nan_ok=True), record["id"]
        assert (low, high, p) == pytest.approx((record["ci_low"], record["ci_high"], record["p_value"]), nan_ok=True)
    primary = [r for r in records if r["family"] == "primary"]
    adjusted = stats.holm([1.0 if math.isnan(r["p_value"]) else r["p_value"] for r in primary])
    for record, p_adjusted in zip(primary, adjusted):
        expected = record["p_value"] if math.isnan(record["p_value"]) else p_adjusted
        assert record["p_adjusted"] == pytest.approx(expected, nan_ok=True), record["id"]
    verdicts = {r["id"]: r["verdict"] for r in records}
    for record, claim in zip(records, protocol.claims):
        if record["family"] != "primary":
            assert record["p_adjusted"] == pytest.approx(record["p_value"], nan_ok=True), record["id"]
        own = stats.claim_verdict(
            record["test"], record["direction"], record["margin"], record["p_adjusted"],
            record["diff_mean"], record["ci_low"], record["ci_high"], protocol.alpha,
        )  # fmt: skip
        assert record["own_verdict"] == own, record["id"]
        premise = claim.get("premise")
        assert record["premise"] == (f"{premise}: {verdicts[premise]}" if premise else ""), record["id"]
        held = not premise or verdicts[premise] == "holds"
        assert record["verdict"] == (own if held else "not resolved"), record["id"]


def proc_stat_line(user: int, idle: int, steal: int) -> str:
    """/proc/stat's first line with these ticks (user nice system idle iowait irq softirq steal
    guest guest_nice), guest time already counted in user."""
    return f"cpu  {user} 0 0 {idle} 0 0 0 {steal} {user // 2} 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n"
