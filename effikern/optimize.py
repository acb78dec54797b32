"""``effikern.optimize``: swap provably equivalent layer patterns in a model for effikern's fused modules.

The walk is generic; what gets replaced is decided by a list of rules (``RULES``). A rule is a function

    rule(window: Sequence[nn.Module]) -> Optional[Rewrite]

``window[0]`` is the module being considered. When its parent is a plain ``nn.Sequential`` (whose forward
is known: each child feeds the next) ``window[1:]`` are the siblings that follow it, so a rule may match a
run of layers; elsewhere the window is ``[module]`` alone. A rule returns None when the module is not its
business, ``Rewrite(length, replacement, reason)`` to replace ``window[:length]``, or a Rewrite with
``replacement=None`` for a candidate it could not prove equivalent (the reason goes to the report). Such a
verdict on a module also covers the rule's verdicts on its direct children, which are not reported again (a
block left for its residual add does not list its depthwise conv as well); other rules' verdicts on them are.
The depthwise-separable rule (:func:`dwsep_rule`) is the first; a family adds its own by appending to
``RULES`` (or passing ``rules=`` to :func:`optimize`).
"""

import copy
import dataclasses
import dis
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import _auto
from .nn._hooks import hooks, run_pruning_hooks
from .nn.dwsep import DepthwiseSeparableConv2d
from .ops.activation import module_activation_name


@dataclasses.dataclass
class Rewrite:
    """A rule's verdict on ``window[:length]``: the module replacing it, or None (left) and why."""

    length: int
    replacement: Optional[nn.Module]
    reason: str


Rule = Callable[[Sequence[nn.Module]], Optional[Rewrite]]


@dataclasses.dataclass
class Entry:
    """One line of the report: the qualified name of the (first) module, 'replaced' or 'left', and why."""

    name: str
    action: str
    reason: str


@dataclasses.dataclass
class Report:
    """What :func:`optimize` did; ``str(report)`` is a table."""

    entries: List[Entry] = dataclasses.field(default_factory=list)

    @property
    def replaced(self) -> List[Entry]:
        return [e for e in self.entries if e.action == "replaced"]

    @property
    def left(self) -> List[Entry]:
        return [e for e in self.entries if e.action == "left"]

    def __str__(self) -> str:
        rows = [("module", "action", "reason")]
        rows += [(e.name or "(model)", e.action, e.reason) for e in self.entries]
        widths = [max(len(row[i]) for row in rows) for i in range(2)]
        lines = [f"effikern.optimize: {len(self.replaced)} replaced, {len(self.left)} left"]
        lines += [f"{name:<{widths[0]}}  {action:<{widths[1]}}  {reason}" for name, action, reason in rows]
        if self.replaced:
            lines.append("note: replaced modules have new state_dict keys; load checkpoints before optimize")
        return "\n".join(lines)


def optimize(model: nn.Module, inplace: bool = True, rules: Optional[Sequence[Rule]] = None
             ) -> Tuple[nn.Module, Report]:
    """Replaces every layer pattern that ``rules`` can prove equivalent by a fused module.

    With the default rules: each depthwise ``Conv2d`` -> [``BatchNorm2d``] -> [activation] -> 1x1 ``Conv2d``
    becomes one :class:`~effikern.nn.DepthwiseSeparableConv2d`, whether the layers are consecutive children
    of an ``nn.Sequential`` (the run becomes one child, under the first layer's name) or the children of a
    module whose forward torch.fx shows to be exactly that chain. Anything not provable (residual adds,
    extra ops, untraceable forwards, hooks, Conv2d subclasses) is left alone, with the reason in the report.

    Outputs are unchanged in both train and eval mode (BatchNorm folds in eval, runs unfused in training).
    The structure is not: replaced layers' ``state_dict`` keys change (``0.weight`` -> ``0.depthwise.weight``,
    ``1.running_mean`` -> ``0.bn.running_mean``, ...), so load checkpoints BEFORE calling optimize, and
    code that reaches into replaced layers by name or index must be updated.

    Args:
        model: any ``nn.Module``.
        inplace: True (default) rewrites ``model`` itself; the fused modules share its Parameter objects, so
            an optimizer built over ``model.parameters()`` beforehand keeps working and no weight is copied. The
            one exception is a pruned layer made sparse: its bias is shared, but its kept weights become a new
            Parameter ``values`` (requires_grad as the dense weight's): add it to such an optimizer, or build the
            optimizer after optimize(). False rewrites a deep copy and leaves ``model`` untouched.
        rules: the rewrite rules to apply, in order (default ``RULES``).

    Returns:
        (model, report). Use the returned model: if ``model`` itself matched it is a new module.
    """
    rules = RULES if rules is None else list(rules)
    if not inplace:
        _leaf_pruned_weights(model)
        model = copy.deepcopy(model)
    report = Report()
    rewrite, left_by = _apply_rules(rules, [model], "", report)
    if rewrite is not None:
        return rewrite.replacement, report
    _rewrite_children(model, "", rules, report, left_by)
    return model, report


def _leaf_pruned_weights(model: nn.Module) -> None:
    """Recomputes every torch.nn.utils.prune'd weight (weight_orig * weight_mask) without autograd history.

    prune keeps the product as a plain attribute holding a graph, which copy.deepcopy refuses ("Only Tensors
    created explicitly by the user support the deepcopy protocol"); the pruning hook recomputes it before each
    forward anyway, so the value is unchanged and training is unaffected.
    """
    with torch.no_grad():
        for module in model.modules():
            run_pruning_hooks(module)


def _apply_rules(rules, window, name, report, explained=()) -> Tuple[Optional[Rewrite], List[Rule]]:
    """The first rule's replacement for ``window`` (or None), and the rules that left it.

    Records the replacement, or every rule's 'left' verdict except those of the rules in ``explained``: rules whose
    'left' verdict on the parent already says why its children stay as they are.
    """
    left = []
    for rule in rules:
        rewrite = rule(window)
        if rewrite is not None and rewrite.replacement is not None:
            report.entries.append(Entry(name, "replaced", rewrite.reason))
            return rewrite, []
        if rewrite is not None:
            left.append((rule, Entry(name, "left", rewrite.reason)))
    report.entries.extend(entry for rule, entry in left if rule not in explained)
    return None, [rule for rule, _ in left]


def _rewrite_children(parent: nn.Module, prefix: str, rules, report, explained=()) -> None:
    """Applies ``rules`` to ``parent``'s children, depth first. ``explained``: the rules that left ``parent`` itself
    (e.g. a block whose forward adds a residual), whose verdicts on its direct children would only repeat why."""
    if _is_effikern_module(parent):
        return  # already fused: its children hold parameters it reads directly, and are never called
    # Only a plain Sequential promises that each child feeds the next; a subclass may override forward.
    runs = type(parent) is nn.Sequential
    names = [name for name, child in parent._modules.items() if child is not None]
    i = 0
    while i < len(names):
        window = [parent._modules[n] for n in (names[i:] if runs else names[i:i + 1])]
        qualified = prefix + names[i]
        rewrite, left_by = _apply_rules(rules, window, qualified, report, explained)
        if rewrite is None:
            _rewrite_children(window[0], qualified + ".", rules, report, left_by)
            i += 1
            continue
        # The replacement takes the first layer's name (and so its place); the rest of the run is dropped.
        setattr(parent, names[i], rewrite.replacement)
        for name in names[i + 1:i + rewrite.length]:
            delattr(parent, name)
        i += rewrite.length


def _is_effikern_module(module: nn.Module) -> bool:
    return type(module).__module__.startswith("effikern.")


# --- the depthwise-separable rule ------------------------------------------------------------------------

def dwsep_rule(window: Sequence[nn.Module]) -> Optional[Rewrite]:
    """depthwise Conv2d -> [BatchNorm2d] -> [activation] -> 1x1 Conv2d => DepthwiseSeparableConv2d.

    Matches a run starting at ``window[0]`` (inside a Sequential), or a module with a depthwise and a 1x1
    ``Conv2d`` child whose traced forward is exactly that chain. Every other depthwise conv is left with the
    reason: a Conv2d subclass, one with a depth multiplier, or one with nothing after it in the window (the last
    child of a Sequential, or a child of a module whose forward was not traced: a ModuleList run by a loop, ...).
    """
    first = window[0]
    multiplier = _depth_multiplier(first)
    if multiplier is not None and type(first) is not nn.Conv2d:
        return Rewrite(1, None, f"depthwise conv of type {type(first).__name__}, a subclass of nn.Conv2d whose "
                                "forward may differ: only nn.Conv2d itself is fused")
    if multiplier is not None and multiplier > 1:
        return Rewrite(1, None, f"depthwise conv with depth multiplier {multiplier} (out_channels "
                                f"{first.out_channels} = {multiplier} x in_channels {first.in_channels}): the fused op "
                                "takes multiplier 1")
    if _is_depthwise(first):
        if len(window) > 1:
            return _match_run(window)
        return Rewrite(1, None, "depthwise conv not followed by a 1x1 nn.Conv2d in an nn.Sequential (the last "
                                "child of one, or outside one, where the data flow is not known)")
    if _is_block_candidate(first):
        return _match_block(first)
    return None


def _is_depthwise(module) -> bool:
    # Exactly Conv2d: subclasses (timm's Conv2dSame, QAT convs, parametrized convs) change forward.
    return type(module) is nn.Conv2d and module.groups == module.in_channels == module.out_channels


def _depth_multiplier(module) -> Optional[int]:
    """out_channels / in_channels of a depthwise nn.Conv2d (or subclass): groups == in_channels, out_channels a
    multiple of it; None for anything else. A conv from 1 channel to several is an ordinary convolution (None)."""
    if not isinstance(module, nn.Conv2d) or module.groups != module.in_channels:
        return None
    multiplier, rest = divmod(module.out_channels, module.in_channels)
    if rest or multiplier < 1 or (multiplier > 1 and module.in_channels == 1):
        return None
    return multiplier


def _is_block_candidate(module) -> bool:
    if isinstance(module, (DepthwiseSeparableConv2d, nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return False
    children = list(module.children())
    return any(_is_depthwise(c) for c in children) and any(
        type(c) is nn.Conv2d and c.kernel_size == (1, 1) for c in children)


class _Unproven(Exception):
    """The pattern does not hold here; the message is the reason shown in the report."""


def _match_run(window) -> Rewrite:
    """Sequential children: window[0] (depthwise) -> [BatchNorm2d] -> [activation] -> 1x1 Conv2d -> ..."""
    try:
        dw, bn, act, pw, length = _split_chain(window)
    except _Unproven as err:
        return Rewrite(1, None, str(err))
    return _build(dw, pw, act, bn, length, f"{length} Sequential children")


def _split_chain(steps):
    """steps = [dw, bn?, act?, pw, ...] -> (dw, bn, act, pw, number of steps used); _Unproven otherwise.

    Steps are modules, or activation names for functional calls in a traced forward.
    """
    rest = list(steps)
    dw = rest.pop(0) if rest and _is_depthwise(rest[0]) else None
    if dw is None:
        raise _Unproven("the first op is not a depthwise nn.Conv2d")
    bn = rest.pop(0) if rest and type(rest[0]) is nn.BatchNorm2d else None
    act = rest.pop(0) if rest and (isinstance(rest[0], str) or module_activation_name(rest[0]) is not None) \
        else None
    if not rest or type(rest[0]) is not nn.Conv2d:
        before = "depthwise" + " -> bn" * (bn is not None) + " -> act" * (act is not None)
        got = "nothing" if not rest else rest[0] if isinstance(rest[0], str) else type(rest[0]).__name__
        raise _Unproven(f"expected a 1x1 nn.Conv2d after {before}, got {got}")
    return dw, bn, act, rest[0], len(steps) - len(rest) + 1


def _build(dw, pw, act, bn, length: int, source: str) -> Rewrite:
    try:
        fused = DepthwiseSeparableConv2d.from_modules(dw, pw, act, bn)
    except ValueError as err:
        return Rewrite(1, None, str(err))
    return Rewrite(length, fused, f"{source}: {_describe(fused)}")


def _describe(module: DepthwiseSeparableConv2d) -> str:
    dw, pw = module.depthwise, module.pointwise
    kh, kw = dw.kernel_size
    steps = [f"dw {kh}x{kw}" + (f" stride {dw.stride}" if dw.stride != (1, 1) else "")]
    steps += ["bn"] * (module.bn is not None) + [module.activation] * (module.activation != "none")
    return " -> ".join(steps + [f"pw {pw.in_channels}->{pw.out_channels}"])


def _match_block(module: nn.Module) -> Rewrite:
    """A module whose traced forward is exactly input -> dw -> [bn] -> [act] -> pw -> output.

    torch.fx records one path through Python control flow, so a forward that branches (``if self.training``,
    ``if self.use_act``) is left alone: the fused module could not take the other path later. So is a module with
    hooks of its own, which the replacement would drop."""
    own = _hook_names(hooks(module))
    if own:
        return Rewrite(1, None, f"the module has hooks ({own}), which its replacement would not run")
    branches = _control_flow(type(module).forward)
    if branches:
        return Rewrite(1, None, f"forward has Python control flow ({branches}), which tracing would freeze")
    try:
        graph = fx.symbolic_trace(module).graph
        # The branches of methods forward calls: a different graph in the other training mode.
        if _traced_code(graph) != _traced_code(_trace_in_other_mode(module)):
            return Rewrite(1, None, "forward traces differently in train and eval mode")
    except Exception as err:  # noqa: BLE001 - any tracing failure just means "not provable"
        return Rewrite(1, None, f"torch.fx cannot trace forward ({type(err).__name__}: {_first_line(err)})")
    try:
        steps = [_step(module, node) for node in _linear_chain(graph)]
        dw, bn, act, pw, length = _split_chain(steps)
        if length != len(steps):
            raise _Unproven(f"{len(steps) - length} more ops follow the pointwise conv")
    except _Unproven as err:
        return Rewrite(1, None, f"forward is not dw -> [bn] -> [act] -> pw: {err}")
    return _build(dw, pw, act, bn, 1, "forward traced by torch.fx")


def _hook_names(found) -> str:
    return ", ".join(type(h).__name__ for h in found)


def _control_flow(function) -> str:
    """The conditional jumps and loops in ``function``'s own bytecode, named by line ("" when there are none)."""
    code = getattr(function, "__code__", None)
    if code is None:
        return ""
    # Every conditional jump's name has "IF_" in it (POP_JUMP_IF_FALSE, POP_JUMP_FORWARD_IF_TRUE, JUMP_IF_TRUE_OR_POP
    # over Python 3.10-3.13); FOR_ITER is a loop.
    jumps = [ins for ins in dis.get_instructions(code) if "IF_" in ins.opname or ins.opname == "FOR_ITER"]
    if not jumps:
        return ""
    lines = sorted({getattr(getattr(ins, "positions", None), "lineno", None) for ins in jumps} - {None})
    return ", ".join(f"line {line}" for line in lines) or f"{len(jumps)} branches or loops"


def _trace_in_other_mode(module: nn.Module) -> fx.Graph:
    modes = {m: m.training for m in module.modules()}
    try:
        for m in modes:
            m.training = not modes[m]
        return fx.symbolic_trace(module).graph
    finally:
        for m, training in modes.items():
            m.training = training


def _traced_code(graph: fx.Graph) -> str:
    return graph.python_code("self").src


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [""])[0][:120]


def _linear_chain(graph: fx.Graph) -> List[fx.Node]:
    """The graph's ops between its single input and its output, each consuming only the previous one."""
    nodes = list(graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise _Unproven(f"forward takes {len(inputs)} inputs, not 1")
    body, output = nodes[1:-1], nodes[-1]
    previous = inputs[0]
    for node in body + [output]:
        if len(previous.users) != 1:
            users = ", ".join(sorted(u.name for u in previous.users))
            raise _Unproven(f"{previous.name} feeds {len(previous.users)} ops ({users}), e.g. a residual add")
        node_inputs = node.all_input_nodes
        if node_inputs != [previous] or not node.args or node.args[0] is not previous:
            what = f"{node.name} ({node.op} {_target_name(node)})"
            raise _Unproven(f"{what} is not applied to {previous.name} alone")
        previous = node
    return body


def _target_name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target))


# Functional activations fx records as call_function targets, with the extra parameters they may be given.
_FUNCTION_ACTIVATIONS = {
    F.relu: ("relu", ("inplace",)), torch.relu: ("relu", ()), F.relu6: ("relu6", ("inplace",)),
    F.silu: ("silu", ("inplace",)), F.hardswish: ("hardswish", ("inplace",)),
    F.gelu: ("gelu", ("approximate",)),
}


def _step(root: nn.Module, node: fx.Node):
    """A chain op as a module, or as an activation name for a functional call; _Unproven otherwise."""
    if node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
        return root.get_submodule(node.target)
    if node.op == "call_function" and node.target in _FUNCTION_ACTIVATIONS:
        name, params = _FUNCTION_ACTIVATIONS[node.target]
        options = dict(zip(params, node.args[1:]), **node.kwargs)
        known = len(node.args) - 1 <= len(params) and set(options) <= set(params)
        # inplace changes nothing here (its input has no other user); gelu must be the exact erf form.
        if known and options.get("approximate", "none") == "none":
            return name
        raise _Unproven(f"{node.name} calls {_target_name(node)} with {options}, which has no fused form")
    raise _Unproven(f"{node.name} ({node.op} {_target_name(node)}) is not a fusable step")


# --- the sparse rule: pruned Linear / 1x1 Conv2d -> SparseLinear / SparseConv2d1x1 ------------------------

# Where a sparse layer was measured faster than the dense one it replaces: (device type, dtype, "unstructured" |
# "2:4" | "block<size>") ->
# ((tokens per call, least sparsity at which the sparse forward beat dense F.linear on every measured weight, or
# None when it never did), ...). Source: benchmarks/results/cpu-sparse-decision-1t.json
# (``python -m benchmarks.bench_sparse``: forward, 4096x4096 and 768x3072, min of 15 calls at 1 thread of the shared
# 2-core AMD EPYC; provisional). A case missing here (any GPU, block16, fp16 on AVX-512) was not measured, and
# stays dense. Keyed by effikern._auto.table_device, as auto's table: "cpu" is the AVX-512 CPU class, "cpu-avx2" the
# AVX2 one (benchmarks/results/cpu-sparse-decision-avx2-1t.json, git eb115cf, fp32 / bf16 / fp16: the same run on
# an AVX2-only AMD EPYC; the previous one, git 3ebe6a9, fp32 / bf16 only, is in results/earlier/).
SPARSE_FASTER = {
    ("cpu", torch.float32, "unstructured"): ((1, 0.95), (16, 0.7), (64, 0.7), (256, 0.7)),
    ("cpu", torch.float32, "block32"): ((1, None), (16, 0.5), (64, 0.5), (256, 0.5)),
    ("cpu", torch.float32, "block64"): ((1, None), (16, 0.5), (64, 0.5), (256, 0.5)),
    ("cpu", torch.bfloat16, "unstructured"): ((1, 0.95), (16, 0.9), (64, 0.9), (256, 0.9)),
    ("cpu", torch.bfloat16, "block32"): ((1, 0.9), (16, 0.7), (64, 0.9), (256, 0.9)),
    ("cpu", torch.bfloat16, "block64"): ((1, None), (16, 0.7), (64, 0.7), (256, 0.9)),
    # On AVX2 PyTorch's dense bf16 and fp16 matmuls are slow (no native bf16: 781 ms for 256 tokens at 4096x4096),
    # so the sparse kernel wins from 50% sparsity at 16 tokens and more. fp32 unstructured at 16 tokens and 50% was
    # at parity with dense on 768x3072 in the eb115cf run (1.46 vs 1.44 ms), so it starts at 70%.
    ("cpu-avx2", torch.float32, "unstructured"): ((1, 0.95), (16, 0.7), (64, 0.7), (256, 0.7)),
    ("cpu-avx2", torch.float32, "block32"): ((1, 0.9), (16, 0.5), (64, 0.7), (256, 0.7)),
    ("cpu-avx2", torch.float32, "block64"): ((1, 0.9), (16, 0.5), (64, 0.7), (256, 0.7)),
    ("cpu-avx2", torch.bfloat16, "unstructured"): ((1, 0.9), (16, 0.5), (64, 0.5), (256, 0.5)),
    ("cpu-avx2", torch.bfloat16, "block32"): ((1, 0.7), (16, 0.5), (64, 0.5), (256, 0.5)),
    ("cpu-avx2", torch.bfloat16, "block64"): ((1, 0.7), (16, 0.5), (64, 0.5), (256, 0.5)),
    ("cpu-avx2", torch.float16, "unstructured"): ((1, 0.9), (16, 0.5), (64, 0.5), (256, 0.5)),
    ("cpu-avx2", torch.float16, "block32"): ((1, 0.9), (16, 0.5), (64, 0.5), (256, 0.5)),
    ("cpu-avx2", torch.float16, "block64"): ((1, 0.9), (16, 0.5), (64, 0.5), (256, 0.5)),
}
# The token count (rows of x per call) the sparse rule assumes; decode-sized by default.
SPARSE_TOKENS = 16
# A layer without a prune mask counts as pruned when at least this fraction of its weight is exactly zero.
_ZERO_FRACTION = 0.5


def sparse_rule(window: Sequence[nn.Module]) -> Optional[Rewrite]:
    """A pruned ``nn.Linear`` or 1x1 ``nn.Conv2d`` (prune mask, or >= 50% zeros) -> its sparse form, when the
    measured table ``SPARSE_FASTER`` says the sparse kernel is faster at ``SPARSE_TOKENS`` tokens; else left, with
    the reason. Outputs are the same: the sparse layer computes the masked weight's product exactly."""
    from .nn import sparse as sparse_nn

    module = window[0]
    is_linear = type(module) is nn.Linear
    is_conv = type(module) is nn.Conv2d and sparse_nn.pointwise_problem(module) is None
    if not (is_linear or is_conv):
        return None
    weight, mask = sparse_nn.pruned_weight_and_mask(module)
    kept = (weight != 0) if mask is None else (mask != 0)
    sparsity = 1.0 - kept.float().mean().item()
    if mask is None and sparsity < _ZERO_FRACTION:
        return None  # an ordinary dense layer: not this rule's business
    kind = "Linear" if is_linear else "1x1 Conv2d"
    extra = _hook_names(hooks(module, skip_pruning=True))
    if extra:
        return Rewrite(1, None, f"pruned {kind}: has hooks other than pruning's ({extra}), which would be lost")
    fmt, block = sparse_nn.choose_format(weight.reshape(weight.shape[0], -1), kept.reshape(weight.shape[0], -1))
    what = f"pruned {kind} {sparsity:.0%} sparse, format {fmt}" + (f" {block[0]}x{block[1]}" if block else "")
    key = (_auto.table_device(weight.device.type), weight.dtype, fmt if block is None else f"block{block[0]}")
    limits = SPARSE_FASTER.get(key)
    if not limits:
        return Rewrite(1, None, f"{what}: no measurement shows the sparse kernel faster on "
                                f"{key[0]} {str(key[1])[6:]} for this format")
    # The measurement at the fewest tokens >= SPARSE_TOKENS: sparse pays less as tokens grow (compute-bound).
    measured = sorted((tokens, least) for tokens, least in limits if tokens >= SPARSE_TOKENS)
    if not measured:
        return Rewrite(1, None, f"{what}: not measured faster than dense at {SPARSE_TOKENS} tokens or more")
    tokens, least = measured[0]
    if least is None or sparsity < least:
        need = "at no measured sparsity" if least is None else f"only at >= {least:.0%} sparsity"
        return Rewrite(1, None, f"{what}: measured faster than dense {need} ({tokens} tokens)")
    if is_linear:
        new = sparse_nn.SparseLinear.from_linear(module, format=fmt, block_size=block)
    else:
        new = sparse_nn.SparseConv2d1x1.from_conv(module, format=fmt, block_size=block)
    return Rewrite(1, new, f"{what}: measured faster than dense at >= {least:.0%} sparsity ({tokens} tokens)")




RULES: List[Rule] = [dwsep_rule, sparse_rule]
