"""Prune a small transformer classifier's feed-forward layers and fine-tune it, with everything effikern has.

    python examples/finetune_transformer.py              # effikern
    python examples/finetune_transformer.py --baseline   # the same recipe in plain PyTorch

The recipe, in both modes:
1. a synthetic sequence-classification set: token sequences with lognormal lengths (median 32, up to 128),
   whose class shows in which tokens they use more often (no downloads);
2. "pre-training": the dense model trains for a few epochs;
3. its feed-forward Linears are pruned to 70% by magnitude and the model is fine-tuned with the pattern
   fixed, distilling from the dense model (kept as the teacher), under autocast (fp16 + loss scaling on GPU,
   bf16 on CPU) with a clipped AdamW step.

effikern: batches from :class:`effikern.data.LengthGroupedBatchSampler` (similar lengths together) padded by
:class:`~effikern.data.DynamicPaddingCollator`; pruned layers converted by :func:`effikern.optimize` (sparse
where it measured faster, its report says which); :class:`effikern.losses.DistillationLoss`;
:class:`effikern.amp.GradScaler` with :class:`effikern.optim.AdamW`. Baseline: random batches padded to
their longest sequence, ``torch.nn.utils.prune`` masks, the eager KD formula, torch's GradScaler and AdamW.
It prints the loss curve, tokens/s (real and padded), padding fraction, peak memory and accuracy.
"""

import argparse
import resource
import time

import torch
import torch.nn.functional as F
import torch.nn.utils.prune
from torch import nn

CLASSES = 4
VOCAB = 512
MAX_LENGTH = 128


def synthetic_sequences(n: int, seed: int):
    """(sequences: list of 1-D int64 tensors, labels [n]). Class c draws 30% of its tokens from its own band of
    the vocabulary and the rest uniformly: a bag-of-tokens signal that needs the whole sequence to read."""
    g = torch.Generator().manual_seed(seed)
    lengths = (torch.log(torch.tensor(32.0)) + 0.7 * torch.randn(n, generator=g)).exp().round().clamp(4, MAX_LENGTH)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    band = VOCAB // CLASSES
    sequences = []
    for length, label in zip(lengths.long().tolist(), labels.tolist()):
        uniform = torch.randint(1, VOCAB, (length,), generator=g)
        own = torch.randint(label * band, (label + 1) * band, (length,), generator=g).clamp(min=1)
        pick = torch.rand(length, generator=g) < 0.3
        sequences.append(torch.where(pick, own, uniform))
    return sequences, labels


class Block(nn.Module):
    """Pre-norm encoder block: self-attention (padding masked) and a GELU feed-forward of two Linears."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attention = nn.MultiheadAttention(d_model, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, h, padding):
        a = self.norm1(h)
        h = h + self.attention(a, a, a, key_padding_mask=padding, need_weights=False)[0]
        return h + self.ffn(self.norm2(h))


class Classifier(nn.Module):
    """forward(input_ids [B, L], attention_mask [B, L] bool) -> logits [B, CLASSES] (mean over real tokens)."""

    def __init__(self, d_model=64, heads=2, layers=2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_model, padding_idx=0)
        self.position = nn.Embedding(MAX_LENGTH, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads) for _ in range(layers))
        self.head = nn.Linear(d_model, CLASSES)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids) + self.position(torch.arange(input_ids.shape[1], device=input_ids.device))
        for block in self.blocks:
            h = block(h, ~attention_mask)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


class Recipe:
    """What differs between effikern and the PyTorch baseline."""

    def __init__(self, baseline: bool, device: torch.device):
        self.baseline, self.device = baseline, device
        self.amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16

    def batches(self, sequences, batch_size, epoch):
        """Yields (input_ids, attention_mask, indices) on the device."""
        if self.baseline:
            order = torch.randperm(len(sequences), generator=torch.Generator().manual_seed(epoch))
            plan = [b.tolist() for b in order.split(batch_size)]
        else:
            from effikern.data import LengthGroupedBatchSampler
            sampler = LengthGroupedBatchSampler([len(s) for s in sequences], batch_size, seed=0)
            sampler.set_epoch(epoch)
            plan = list(sampler)
        for idx in plan:
            chosen = [sequences[i] for i in idx]
            if self.baseline:
                ids = nn.utils.rnn.pad_sequence(chosen, batch_first=True)
                mask = torch.arange(ids.shape[1]) < torch.tensor([len(s) for s in chosen]).unsqueeze(1)
            else:
                from effikern.data import DynamicPaddingCollator
                out = DynamicPaddingCollator(pad_to_multiple_of=8)(chosen)
                ids, mask = out["input_ids"], out["attention_mask"].bool()
            yield ids.to(self.device), mask.to(self.device), torch.tensor(idx)

    def prune_ffn(self, model):
        ffn_linears = [m for b in model.blocks for m in b.ffn if isinstance(m, nn.Linear)]
        if self.baseline:
            for layer in ffn_linears:
                torch.nn.utils.prune.l1_unstructured(layer, "weight", amount=0.7)
            return model, "torch.nn.utils.prune masks (dense matmuls)"
        import effikern
        import effikern.prune
        for layer in ffn_linears:
            effikern.prune.prune_model(nn.Sequential(layer), amount=0.7, pattern="unstructured")
        model, report = effikern.optimize(model)
        return model, "; ".join(f"{e.name}: {e.action} ({e.reason})" for e in report.entries) or "no candidates"

    def optimizer(self, params, lr):
        if self.baseline:
            return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
        import effikern.optim
        return effikern.optim.AdamW(params, lr=lr, weight_decay=0.01)

    def scaler(self):
        # bf16 (CPU) needs no loss scaling: off, effikern's unscale_(max_norm) still measures and clips (below).
        enabled = self.amp_dtype == torch.float16
        if self.baseline:
            return torch.amp.GradScaler(self.device.type, enabled=enabled)
        import effikern.amp
        return effikern.amp.GradScaler(self.device.type, enabled=enabled)

    def kd_loss(self, temperature=2.0, alpha=0.5):
        if self.baseline:
            def eager(student_logits, teacher_logits, target):
                s, t = student_logits.float(), teacher_logits.float()
                kl = F.kl_div(F.log_softmax(s / temperature, -1), F.softmax(t / temperature, -1),
                              reduction="batchmean")
                return alpha * temperature**2 * kl + (1 - alpha) * F.cross_entropy(s, target)
            return eager
        from effikern.losses import DistillationLoss
        return DistillationLoss(temperature, alpha)

    def clipped_step(self, scaler, optimizer, max_norm=1.0):
        if self.baseline:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], max_norm)
        else:
            # One fused read-only pass (inf check + norm of the unscaled grads; the norm alone when the scaler is
            # off, on CPU); 1/scale and the clip are folded into AdamW's step.
            scaler.unscale_(optimizer, max_norm=max_norm)
        scaler.step(optimizer)
        scaler.update()


def accuracy(model, recipe, sequences, labels, batch_size=128) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for ids, mask, idx in recipe.batches(sequences, batch_size, epoch=0):
            correct += (model(ids, mask).argmax(1).cpu() == labels[idx]).sum().item()
    model.train()
    return correct / len(labels)


def peak_memory_mib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", action="store_true", help="plain PyTorch, for comparison")
    parser.add_argument("--pretrain-epochs", type=int, default=4)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0, help="draws other data and initial weights (0: as shipped)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    recipe = Recipe(args.baseline, device)
    print(f"mode: {'PyTorch baseline' if args.baseline else 'effikern'} on {device}, autocast {recipe.amp_dtype}")
    sequences, labels = synthetic_sequences(args.train_size, seed=1 + 100 * args.seed)
    test_sequences, test_labels = synthetic_sequences(512, seed=2 + 100 * args.seed)

    torch.manual_seed(args.seed)
    model = Classifier().to(device)
    optimizer, scaler = recipe.optimizer(model.parameters(), lr=1e-3), recipe.scaler()
    losses, real_tokens, padded_tokens, train_time = [], 0, 0, 0.0
    teacher = kd_loss = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for epoch in range(args.pretrain_epochs + args.finetune_epochs):
        if epoch == args.pretrain_epochs:
            teacher = Classifier().to(device)
            teacher.load_state_dict(model.state_dict())
            teacher.eval()
            model, how = recipe.prune_ffn(model)
            optimizer, kd_loss = recipe.optimizer(model.parameters(), lr=5e-4), recipe.kd_loss()
            print(f"epoch {epoch}: feed-forward pruned to 70%, fine-tuning with distillation: {how}")
        start, epoch_losses = time.perf_counter(), []
        for ids, mask, idx in recipe.batches(sequences, args.batch_size, epoch):
            y = labels[idx].to(device)
            with torch.autocast(device.type, dtype=recipe.amp_dtype):
                logits = model(ids, mask)
            if teacher is None:
                loss = F.cross_entropy(logits.float(), y)
            else:
                with torch.no_grad(), torch.autocast(device.type, dtype=recipe.amp_dtype):
                    teacher_logits = teacher(ids, mask)
                loss = kd_loss(logits.float(), teacher_logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            recipe.clipped_step(scaler, optimizer)
            epoch_losses.append(loss.detach())
            real_tokens += int(mask.sum())
            padded_tokens += mask.numel()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_time += time.perf_counter() - start
        losses.append(torch.stack(epoch_losses).mean().item())
        print(f"epoch {epoch}: loss {losses[-1]:.4f}")

    acc = accuracy(model, recipe, test_sequences, test_labels)
    print(f"loss curve: {' -> '.join(f'{v:.3f}' for v in losses)}")
    print(f"accuracy: {acc:.3f} (chance {1 / CLASSES:.3f})")
    print(f"throughput: {real_tokens / train_time:.0f} real tokens/s, {padded_tokens / train_time:.0f} padded "
          f"tokens/s; padding {1 - real_tokens / padded_tokens:.1%}; peak memory {peak_memory_mib(device):.0f} MiB")
    return {"losses": losses, "accuracy": acc, "tokens_per_s": real_tokens / train_time}


if __name__ == "__main__":
    main()
