"""Train a small MobileNet-style classifier on synthetic images with everything effikern has.

    python examples/train_mobilenet.py              # effikern: fused dwsep blocks, pruned sparse head,
                                                    #   fused GradScaler + AdamW, fused distillation loss
    python examples/train_mobilenet.py --baseline   # the same network and recipe in plain PyTorch

What it does, in both modes:
1. builds a synthetic 10-class image set (each class is a fixed random pattern plus noise; no downloads);
2. trains a larger plain-PyTorch teacher CNN for a few epochs;
3. trains the student (depthwise-separable blocks + an MLP head) with a distillation loss from the teacher,
   under autocast (fp16 with loss scaling on GPU, bf16 on CPU) and a clipped AdamW step;
4. halfway through, prunes the head's first Linear to 90% (magnitude) and keeps fine-tuning it with the
   pattern fixed: effikern converts it with ``effikern.optimize`` (a sparse layer that skips the pruned
   weights); the baseline keeps ``torch.nn.utils.prune``'s dense masked weight;
5. prints the loss curve, throughput, peak memory and held-out accuracy.

The two modes use the same seeds, data and hyper-parameters, so their numbers are comparable.
"""

import argparse
import resource
import time

import torch
import torch.nn.functional as F
import torch.nn.utils.prune
from torch import nn

CLASSES = 10
IMAGE = 32


def synthetic_images(n: int, seed: int, device):
    """(images [n, 3, 32, 32], labels [n]): class c is template c (a fixed smooth random pattern) scaled by a
    random contrast, plus Gaussian noise; learnable in a few epochs, far from trivial at the noise level used."""
    g = torch.Generator().manual_seed(1234)  # templates: the same for every split
    templates = F.interpolate(torch.randn(CLASSES, 3, 8, 8, generator=g), size=IMAGE, mode="bilinear")
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    contrast = 0.5 + torch.rand(n, 1, 1, 1, generator=g)
    images = contrast * templates[labels] + 2.5 * torch.randn(n, 3, IMAGE, IMAGE, generator=g)
    return images.to(device), labels.to(device)


def teacher_net() -> nn.Module:
    """A plain CNN with full 3x3 convolutions: several times the student's compute per image."""
    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                             nn.MaxPool2d(2))
    return nn.Sequential(block(3, 24), block(24, 48), block(48, 96), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(96, CLASSES))


def student_net(fused: bool) -> nn.Module:
    """Stem conv, four depthwise-separable blocks (3x3 depthwise, ReLU6, 1x1 pointwise, BatchNorm, ReLU6),
    pooled MLP head.

    ``fused``: the blocks are :class:`effikern.nn.DepthwiseSeparableConv2d`; otherwise the two-conv
    PyTorch equivalent (the same parameters and state_dict keys)."""
    def dwsep(cin, cout, stride):
        if fused:
            from effikern.nn import DepthwiseSeparableConv2d
            return DepthwiseSeparableConv2d(cin, cout, 3, stride=stride, padding=1, activation="relu6")
        return nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin), nn.ReLU6(), nn.Conv2d(cin, cout, 1))

    def stage(cin, cout, stride):  # the pointwise output is batch-normalized, as in MobileNet
        return [dwsep(cin, cout, stride), nn.BatchNorm2d(cout), nn.ReLU6()]

    return nn.Sequential(
        nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU6(),
        *stage(32, 64, 1), *stage(64, 128, 2), *stage(128, 128, 1), *stage(128, 256, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, CLASSES),
    )


HEAD_HIDDEN = -3  # index of the head's first Linear in student_net: the layer pruned to 90%


def batches(images, labels, batch_size, seed):
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).to(images.device)
    for i in range(0, len(labels) - batch_size + 1, batch_size):
        idx = order[i:i + batch_size]
        yield images[idx], labels[idx]


def accuracy(model, images, labels, batch_size=256) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(labels), batch_size):
            correct += (model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum().item()
    model.train()
    return correct / len(labels)


def train_teacher(images, labels, epochs, batch_size, device, seed=0):
    torch.manual_seed(seed)
    teacher = teacher_net().to(device)
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    for epoch in range(epochs):
        for x, y in batches(images, labels, batch_size, seed=100 + epoch):
            loss = F.cross_entropy(teacher(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return teacher.eval()


class Recipe:
    """The pieces that differ between effikern and the PyTorch baseline."""

    def __init__(self, baseline: bool, device: torch.device):
        self.baseline = baseline
        self.device = device
        self.amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16

    def student(self):
        return student_net(fused=not self.baseline).to(self.device)

    def optimizer(self, params, lr):
        if self.baseline:
            return torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
        import effikern.optim
        return effikern.optim.AdamW(params, lr=lr, weight_decay=1e-4)

    def scaler(self):
        # Loss scaling is what fp16 needs; bf16 (the CPU's autocast type) has fp32's range, so it is off there
        # in both modes. Off, torch's scaler does nothing (the baseline clips with clip_grad_norm_); effikern's
        # unscale_(max_norm) still makes its one read-only pass (the norm: nothing to unscale or check) and folds
        # the clip into AdamW's step.
        enabled = self.amp_dtype == torch.float16
        if self.baseline:
            return torch.amp.GradScaler(self.device.type, enabled=enabled)
        import effikern.amp
        return effikern.amp.GradScaler(self.device.type, enabled=enabled)

    def loss_fn(self, temperature=2.0, alpha=0.5):
        if self.baseline:
            def eager_kd(student_logits, teacher_logits, target):
                s, t = student_logits.float(), teacher_logits.float()
                kl = F.kl_div(F.log_softmax(s / temperature, -1), F.softmax(t / temperature, -1),
                              reduction="batchmean")
                return alpha * temperature**2 * kl + (1 - alpha) * F.cross_entropy(s, target)
            return eager_kd
        from effikern.losses import DistillationLoss
        return DistillationLoss(temperature, alpha)

    def clipped_step(self, scaler, optimizer, max_norm=1.0):
        """Unscale, clip to ``max_norm`` and step. effikern: one fused read-only pass over the grads (inf check and
        norm of the unscaled grads with fp16 on GPU; the norm alone with bf16 on CPU, where the scaler is off), then
        1/scale and the clip folded into the fused optimizer's step, no host sync. PyTorch: unscale_ (a no-op when
        off), clip_grad_norm_, step."""
        if self.baseline:
            scaler.unscale_(optimizer)
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            scaler.unscale_(optimizer, max_norm=max_norm)
        scaler.step(optimizer)
        scaler.update()

    def prune_head(self, model):
        """Prunes the head's first Linear to 90% by magnitude; effikern then swaps it for a sparse layer."""
        layer = model[HEAD_HIDDEN]
        if self.baseline:
            torch.nn.utils.prune.l1_unstructured(layer, "weight", amount=0.9)
            return model, "torch.nn.utils.prune mask (dense matmul)"
        import effikern
        import effikern.prune
        effikern.prune.prune_model(nn.Sequential(layer), amount=0.9, pattern="unstructured")
        model, report = effikern.optimize(model)
        return model, "; ".join(f"{e.name}: {e.action} ({e.reason})" for e in report.entries) or "no candidates"


def peak_memory_mib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; the whole process


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", action="store_true", help="plain PyTorch, for comparison")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--teacher-epochs", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0, help="draws other data and initial weights (0: as shipped)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    recipe = Recipe(args.baseline, device)
    print(f"mode: {'PyTorch baseline' if args.baseline else 'effikern'} on {device}, autocast {recipe.amp_dtype}")

    # The class templates stay fixed (the task); the seed draws the splits' samples and the initial weights.
    images, labels = synthetic_images(args.train_size, seed=1 + 100 * args.seed, device=device)
    test_images, test_labels = synthetic_images(1024, seed=2 + 100 * args.seed, device=device)
    teacher = train_teacher(images, labels, args.teacher_epochs, args.batch_size, device, seed=args.seed)
    print(f"teacher accuracy: {accuracy(teacher, test_images, test_labels):.3f}")

    torch.manual_seed(args.seed)
    student = recipe.student()
    optimizer = recipe.optimizer(student.parameters(), lr=3e-3)
    scaler, kd_loss = recipe.scaler(), recipe.loss_fn()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, seen, train_time = [], 0, 0.0
    for epoch in range(args.epochs):
        if epoch == args.epochs // 2:
            student, how = recipe.prune_head(student)
            optimizer = recipe.optimizer(student.parameters(), lr=1e-3)  # new param set after the swap
            print(f"epoch {epoch}: head pruned to 90%: {how}")
        start = time.perf_counter()
        epoch_losses = []
        for x, y in batches(images, labels, args.batch_size, seed=epoch):
            with torch.no_grad():
                teacher_logits = teacher(x)
            with torch.autocast(device.type, dtype=recipe.amp_dtype):
                logits = student(x)
            loss = kd_loss(logits.float(), teacher_logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            recipe.clipped_step(scaler, optimizer)
            epoch_losses.append(loss.detach())
            seen += len(y)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_time += time.perf_counter() - start
        losses.append(torch.stack(epoch_losses).mean().item())
        print(f"epoch {epoch}: loss {losses[-1]:.4f}")

    acc = accuracy(student, test_images, test_labels)
    print(f"loss curve: {' -> '.join(f'{v:.3f}' for v in losses)}")
    print(f"student accuracy: {acc:.3f} (chance {1 / CLASSES:.3f})")
    print(f"throughput: {seen / train_time:.0f} images/s; peak memory: {peak_memory_mib(device):.0f} MiB")
    return {"losses": losses, "accuracy": acc, "images_per_s": seen / train_time}


if __name__ == "__main__":
    main()
