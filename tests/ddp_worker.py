"""One rank of the data-parallel tests (tests/test_data_parallel.py), started by torchrun.

    torchrun --nproc_per_node 2 tests/ddp_worker.py CASES.json OUT.pt

CASES.json holds a list of runs, each {"id": ..., "runs": [Config fields, ...]}: the runs of a case
go one after the other through the real entry point, `gvr_lab.train(Config)`, on every rank (a
case of several runs is a run stopped with stop_after and resumed). After a case, every rank's
model state and method state, and the dropout mask of its last run's first training forward (None
without dropout), are gathered, and rank 0 saves them all, by case id, to OUT.pt.
"""

import json
import sys

import torch
import torch.distributed as dist

from gvr_lab import Config, train, training

built = {}
build_model = training.build_model


def capture(*args, **kwargs):
    built["model"], built["optimizer"], built["method"] = parts = build_model(*args, **kwargs)
    built["mask"] = None
    for module in parts[0].modules():
        if isinstance(module, torch.nn.Dropout):
            module.register_forward_hook(record_mask)
    return parts


def record_mask(module, inputs, output):
    """The features dropout zeroed (the smooth tiny CNN's are all positive), on the first training forward."""
    if module.training and built["mask"] is None:
        built["mask"] = output.eq(0) & inputs[0].ne(0)


training.build_model = capture  # the loop's builder, recorded: the test compares what each rank holds


def on_cpu(state):
    return torch.utils._pytree.tree_map(lambda v: v.detach().cpu().clone() if torch.is_tensor(v) else v, state)


def main(cases_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    results = {}
    for case in json.loads(open(cases_file).read()):
        for fields in case["runs"]:
            train(Config(**fields))
        mine = on_cpu(
            {"model": built["model"].state_dict(), "method": built["method"].state_dict(), "mask": built["mask"]}
        )
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        results[case["id"]] = gathered
    if dist.get_rank() == 0:
        torch.save(results, out_file)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
