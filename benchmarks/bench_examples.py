"""The end-to-end examples (examples/*.py), each in effikern mode and as its plain-PyTorch ``--baseline``.

Not timed cases: each example reports its own throughput, loss curve and held-out accuracy, and this family
records them (``report``) next to the device, versions and git sha the runner writes. Runs only from a source
checkout (the examples are not part of the wheel); elsewhere it records why it did not run. Default
arguments in both modes (on this project's 2-core CPU: 8-15 s a run).
"""

import importlib
import os
import sys

FAMILY = "examples"
EXAMPLES = {"train_mobilenet": "images_per_s", "finetune_transformer": "tokens_per_s"}


def cases(device, quick):
    return []


def _examples_dir():
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, "..", "examples")
    return path if os.path.isdir(path) else None


def report(quick):
    """One dict per (example, mode): throughput (real images or tokens per second), first and last epoch
    loss, accuracy on held-out synthetic data."""
    folder = _examples_dir()
    if folder is None:
        return [{"family": FAMILY, "note": "examples/ not found (not a source checkout): not run"}]
    sys.path.insert(0, folder)
    try:
        rows = []
        for name, unit in EXAMPLES.items():
            module = importlib.import_module(name)
            for baseline in (False, True):
                result = module.main(["--baseline"] if baseline else [])
                rows.append({"family": FAMILY, "example": name, "mode": "baseline" if baseline else "effikern",
                             unit: round(result[unit], 1), "first_loss": round(result["losses"][0], 4),
                             "last_loss": round(result["losses"][-1], 4), "accuracy": round(result["accuracy"], 4)})
        return rows
    finally:
        sys.path.remove(folder)
