"""torch.compile is a fast path, not another method: compiled and eager training agree."""

import pytest
import torch

from gvr_lab import Config, create_method, create_model, train
from gvr_lab.results import load_checkpoint

# Every family's first-order path; the exact double-backward paths are refused by AOTAutograd.
# An fd quotient divides a difference of gradients by h = fd_eps / ||v||: at the default fd_eps =
# 1e-3 it turns inductor's reordered fp32 sums into weight differences of 3e-4 after 8 steps
# (reg_loss) and of 6.6e-4 (gvr, with one thread per test worker), at 5e-2 into 1.5e-8 and 7e-7;
# the larger step tests the compiled path, not fp32's fd noise.
COMPILED = [
    ("sgd", {}),
    ("sam", {}),
    ("gvr", {"penalty": "closed_form", "target": "fc"}),
    ("gvr", {"penalty": "fd", "fd_eps": 0.05}),
    ("reg_loss", {"hvp": "fd", "micro_batch_size": 16, "fd_eps": 0.05}),
    ("vsam", {"warmup_epochs": 0, "window": 2, "blocks": 1}),
]


@pytest.mark.slow
@pytest.mark.parametrize("method, args", COMPILED, ids=[f"{m}-{'-'.join(map(str, a.values()))}" for m, a in COMPILED])
def test_compiled_training_equals_eager(tmp_path, method, args):
    torch._dynamo.reset()
    base = dict(
        dataset="synthetic",
        model="tiny_cnn",
        method=method,
        method_args=args,
        epochs=2,
        batch_size=32,
        train_subset=128,
        device="cpu",
        progress=False,
    )
    eager = train(Config(**base, out_dir=str(tmp_path / "eager")))
    frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = train(Config(**base, compile=True, out_dir=str(tmp_path / "compiled")))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > frames_before  # it did compile
    a = load_checkpoint(tmp_path / "eager" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "compiled" / "checkpoint.pt")["model"]
    for k in a:  # inductor fuses and reorders float32 sums: agreement to rounding, not bits
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    for col in ("train_loss", "test_loss", "test_acc"):
        assert compiled.history[col].tolist() == pytest.approx(eager.history[col].tolist(), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize(
    "method, args, compilable",
    [
        ("gvr", {"penalty": "exact"}, False),
        ("gvr", {"penalty": "fd"}, True),
        ("gvr", {"penalty": "closed_form", "target": "fc"}, True),
        ("reg_loss", {}, False),
        ("reg_loss", {"hvp": "fd"}, True),
        ("sam", {}, True),
    ],
)
def test_only_double_backward_paths_opt_out_of_compile(method, args, compilable):
    model = create_model("tiny_cnn")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert create_method(method, model, opt, **args).compilable is compilable
