"""LoRA: trainable low-rank updates on frozen Linear and 1x1-conv layers.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685. A frozen layer
`W` gets a trainable update of rank r: `y = W x + (alpha / r) * B(A(x))`, with A: in -> r, B: r -> out.
B starts at zero, so training starts from the base model exactly. Scale and layers follow peft's
`lora.Linear` / `lora.Conv2d`, the layers diffusers uses. A's init (`INITS`): "gaussian", A ~ N(0, (1/r)^2), the
default, as diffusers' train_dreambooth_lora.py asks peft for (`init_lora_weights="gaussian"`); or "kaiming",
nn.Linear's Kaiming-uniform (std about 1/sqrt(3 in)), which peft's own default and kohya's sd-scripts use.

Checkpoint-name contract: a LoRA layer replaces the layer at the same path and keeps its parameters as
`weight` / `bias`, so the base keys are unchanged (`...attn2.to_k.weight` still loads strict=True), and
adds `...attn2.to_k.lora_A.weight` / `...lora_B.weight`, the names peft gives them. A LoRA file is these
keys under a model prefix (`unet.`, `text_encoder.`): diffusers' `pytorch_lora_weights.safetensors`.
The kohya / A1111 / ComfyUI layout (`lora_unet_..._to_q.lora_down.weight`, `.alpha`) is written and read too.

Shapes: A (r, in) or (r, in, 1, 1), B (out, r) or (out, r, 1, 1); r the rank.
"""
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from hub import atomic_write, read_safetensors
from single_file import rename, unet_blocks

# The attention projections: what diffusers' DreamBooth LoRA script targets in the UNet.
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")   # the CLIP text encoder's attention projections
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # the file name `load_lora_weights(folder)` looks for
INITS = ("gaussian", "kaiming")


# ----------------------------------------------------------------------------- layers

class LoRALayer(nn.Module):
    """What LoRALinear and LoRAConv2d share: the frozen base weight/bias, A and B, scale, merging."""

    def __init__(self, base: nn.Module, lora_A: nn.Module, lora_B: nn.Module, rank: int, alpha, dropout: float,
                 init: str = "gaussian"):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"LoRA init must be one of {', '.join(INITS)}, got '{init}'")
        # the base tensors themselves (no copy) under the base names, so the state-dict keys do not change
        self.weight = nn.Parameter(base.weight.detach(), requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach(), requires_grad=False)
        self.rank, self.alpha = rank, float(rank if alpha is None else alpha)
        self.scale = self.alpha / rank
        # LoRA weights stay fp32 whatever the base dtype: fp16 trainable weights break gradient unscaling
        # (peft does the same with `autocast_adapter_dtype=True`)
        self.lora_A = lora_A.to(device=base.weight.device, dtype=torch.float32)
        self.lora_B = lora_B.to(device=base.weight.device, dtype=torch.float32)
        # paper 4.1: A random, B = 0 so the update starts at 0. With B = 0 the first updates of B scale with |A|,
        # so the init sets the early learning speed: "gaussian" (std 1/r: 0.25 at r = 4) is diffusers' DreamBooth-LoRA
        # choice (peft `init_lora_weights="gaussian"`); "kaiming" (nn.Linear's default, a = sqrt(5); std
        # 1/sqrt(3 in): 0.018 at in = 1024) is peft's default and kohya's
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / rank)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout)
        self.merged = False

    def base_forward(self, x):
        raise NotImplementedError

    def forward(self, x):
        out = self.base_forward(x)
        if self.merged:  # the update already lives in `weight`
            return out
        lora = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))))
        return out + self.scale * lora.to(out.dtype)

    def delta_weight(self):
        """scale * B @ A in the base weight's shape (a 1x1 conv is a matrix on the channels)."""
        return (self.lora_B.weight.flatten(1) @ self.lora_A.weight.flatten(1)).view(self.weight.shape) * self.scale

    @torch.no_grad()
    def merge(self):
        """Fold the update into `weight` (no extra cost at inference); forward then skips the LoRA branch."""
        if not self.merged:
            self.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight -= self.delta_weight().to(self.weight.dtype)
            self.merged = False

    def extra_repr(self):
        return f"rank={self.rank}, alpha={self.alpha:g}, merged={self.merged}"


class LoRALinear(LoRALayer):
    def __init__(self, base: nn.Linear, rank: int = 4, alpha=None, dropout: float = 0.0, init: str = "gaussian"):
        super().__init__(base, nn.Linear(base.in_features, rank, bias=False),
                         nn.Linear(rank, base.out_features, bias=False), rank, alpha, dropout, init)

    def base_forward(self, x):
        return F.linear(x, self.weight, self.bias)


class LoRAConv2d(LoRALayer):
    """LoRA on a 1x1 convolution (SD1's `proj_in` / `proj_out`): A and B are 1x1 convs too."""

    def __init__(self, base: nn.Conv2d, rank: int = 4, alpha=None, dropout: float = 0.0, init: str = "gaussian"):
        if not is_pointwise_conv(base):
            raise ValueError(f"LoRAConv2d takes a 1x1 conv (stride 1, no padding, groups 1), got {base}")
        super().__init__(base, nn.Conv2d(base.in_channels, rank, 1, bias=False),
                         nn.Conv2d(rank, base.out_channels, 1, bias=False), rank, alpha, dropout, init)

    def base_forward(self, x):
        return F.conv2d(x, self.weight, self.bias)


def is_pointwise_conv(m) -> bool:
    return (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride == (1, 1) and m.padding in ((0, 0), "valid")
            and m.groups == 1 and m.dilation == (1, 1))


def wrap(module: nn.Module, name: str, rank: int, alpha, dropout: float = 0.0, init: str = "gaussian") -> LoRALayer:
    if isinstance(module, LoRALayer):
        raise ValueError(f"'{name}' already has a LoRA: inject once, or load into the injected model")
    if isinstance(module, nn.Linear):
        return LoRALinear(module, rank, alpha, dropout, init)
    if is_pointwise_conv(module):
        return LoRAConv2d(module, rank, alpha, dropout, init)
    raise TypeError(f"'{name}' is a {module}: LoRA targets must be nn.Linear or 1x1 nn.Conv2d")


# ----------------------------------------------------------------------------- injection

def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)  # works for ModuleList children ("to_out.0") too


def inject_lora(model: nn.Module, targets=UNET_TARGETS, rank: int = 4, alpha=None, filter=None,
                dropout: float = 0.0, init: str = "gaussian") -> list[str]:
    """Replace every module whose name ends with a target (on a `.` boundary) by its LoRA layer.

    `targets` are explicit suffixes ("to_out.0" matches "...attn1.to_out.0", not "...xto_out.0");
    `filter(name) -> bool` narrows further (e.g. `lambda n: ".attn2." in n` for cross-attention only).
    alpha defaults to rank (diffusers' default `lora_alpha`), i.e. scale 1; `init` is A's init (`INITS`, "gaussian"
    by default, as diffusers' DreamBooth-LoRA). Freezes nothing else: see
    `mark_only_lora_trainable`. Returns the replaced module names.
    """
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    names = [name for name, _ in model.named_modules()
             if any(name == t or name.endswith("." + t) for t in targets) and (filter is None or filter(name))]
    if not names:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:4]
        raise ValueError(f"inject_lora: no module of {type(model).__name__} ends with any of {targets}"
                         f"{' (after filter)' if filter else ''}; its Linear layers are named like {linears}")
    for name in names:
        replace_module(model, name, wrap(model.get_submodule(name), name, rank, alpha, dropout, init))
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_layers(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


def mark_only_lora_trainable(model: nn.Module) -> list[nn.Parameter]:
    """Freeze everything but A and B; returns the trainable parameters (for the optimizer). Inject after casting
    the base to half precision: A and B are created float32 and stay so (LoRALayer)."""
    model.requires_grad_(False)
    params = lora_parameters(model)
    for p in params:
        p.requires_grad_(True)
    return params


def set_lora_scale(model: nn.Module, scale: float) -> None:
    """Every LoRA layer's update weight at inference, y = W x + scale B A x (trained with alpha / r; diffusers'
    `cross_attention_kwargs={"scale": ...}`, PhotoVerse's alpha in K = W_k + alpha dW); 0 is the base model."""
    for m in lora_layers(model).values():
        if m.merged:
            raise ValueError("set_lora_scale: the LoRA is merged; unmerge_lora first")
        m.scale = float(scale)


def merge_lora(model: nn.Module) -> None:
    for m in lora_layers(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_layers(model).values():
        m.unmerge()


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{'{path}.lora_A.weight': A, '{path}.lora_B.weight': B} for every LoRA layer."""
    return {f"{name}.{ab}.weight": getattr(m, ab).weight for name, m in lora_layers(model).items()
            for ab in ("lora_A", "lora_B")}


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without the LoRA keys: loads strict=True into the un-injected model.
    After `merge_lora` it is the fine-tuned model (base weights plus the update)."""
    lora_keys = set(lora_state_dict(model))
    return {k: v for k, v in model.state_dict().items() if k not in lora_keys}


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The fine-tuned model's state dict, W + scale * B A in each LoRA layer's `weight`, without merging
    (the model is not changed). For a model with no LoRA it is the state dict."""
    sd = base_state_dict(model)
    for name, layer in lora_layers(model).items():
        if not layer.merged:
            sd[f"{name}.weight"] = layer.weight + layer.delta_weight().to(layer.weight.dtype)
    return sd


# ----------------------------------------------------------------------------- files
# Two layouts, both carrying rank (the shapes) and alpha, so the scale alpha / r is never lost:
# - diffusers / peft (`save_lora`, the default): `{prefix}.{path}.lora_A.weight` / `.lora_B.weight` for each
#   model (`unet`, `text_encoder`), B unscaled. The scale is in the metadata twice: diffusers' own
#   `lora_adapter_metadata` (a peft `LoraConfig` per prefix: r, lora_alpha, target_modules; read by
#   `load_lora_weights` / `load_lora_adapter` since diffusers 0.34, PR #11324), and ours, `nanobooth` =
#   {prefix: {rank, alpha}}.
# - kohya / A1111 / ComfyUI (`save_lora_kohya`): `lora_unet_{path with . -> _}.lora_down.weight` (A),
#   `.lora_up.weight` (B) and `.alpha` (a 0-d tensor) per module; the text encoder's prefix is `lora_te_`
#   with transformers 4's names (`lora_te_text_model_encoder_layers_0_self_attn_q_proj`), which diffusers'
#   `_convert_non_diffusers_lora_to_diffusers` (loaders/lora_conversion_utils.py) maps back. SDXL's
#   (sd-scripts' sdxl_train_network.py) names the text encoders `lora_te1_` / `lora_te2_` and the UNet's
#   modules by the original (LDM / SGM) layout, `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`,
#   which diffusers' `_maybe_map_sgm_blocks_to_diffusers` maps back; we write that and read both namings.
# Both read into one form, {prefix: {module path: {"A", "B", "alpha"}}}, which `load_lora` applies.

KOHYA = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
KOHYA_SDXL = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
KOHYA_PARAMS = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha"}


def is_sdxl_unet(model) -> bool:
    return getattr(getattr(model, "config", None), "addition_embed_type", None) == "text_time"


def sgm_names(unet, paths) -> dict[str, str]:
    """{our module path: its path in the original SDXL UNet layout} (`down_blocks.1.attentions.0...` ->
    `input_blocks.4.1...`), by single_file.py's block rules."""
    return rename(paths, unet_blocks(unet.config))


def lora_file(path) -> Path:
    path = Path(path)
    return path if path.suffix == ".safetensors" else path / WEIGHTS_NAME


def model_modules(models: dict[str, nn.Module], kind: str) -> dict[str, dict[str, dict]]:
    """{prefix: {path: {"A", "B", "alpha"}}} of models' LoRA layers, for saving (`kind` names the format)."""
    modules = {}
    for prefix, m in models.items():
        layers = lora_layers(m)
        if not layers:
            raise ValueError(f"{kind}: the '{prefix}' model has no LoRA layers (call inject_lora first)")
        if any(layer.merged for layer in layers.values()):
            raise ValueError(f"{kind}: '{prefix}' is merged; call unmerge_lora first so B is saved on its own")
        modules[prefix] = {name: {"A": layer.lora_A.weight, "B": layer.lora_B.weight, "alpha": layer.alpha}
                           for name, layer in layers.items()}
    return modules


def save_lora(path, model, prefix: str = "unet") -> Path:
    """Write the LoRA weights of `model` (or of each model in a {prefix: model} dict) to one file.
    `path` is a .safetensors file or a folder (then `pytorch_lora_weights.safetensors` in it)."""
    models = model if isinstance(model, dict) else {prefix: model}
    tensors, ours, theirs = {}, {}, {}
    for prefix, modules in model_modules(models, "save_lora").items():
        configs = {(ab["A"].shape[0], ab["alpha"]) for ab in modules.values()}
        if len(configs) > 1:
            raise ValueError(f"save_lora stores one rank and alpha per model; '{prefix}' has {sorted(configs)}: "
                             f"use save_lora_kohya, which stores an alpha per module")
        (rank, alpha), = configs
        for name, ab in modules.items():
            tensors |= {f"{prefix}.{name}.lora_{x}.weight": ab[x].detach().to("cpu").contiguous() for x in "AB"}
        ours[prefix] = {"rank": rank, "alpha": alpha}
        # transformers >= 5 drops CLIPTextModel's `text_model.` level, and diffusers strips it from the
        # keys but not from target_modules; peft matches names by suffix, so the shorter name fits both
        theirs.update({f"{prefix}.r": rank, f"{prefix}.lora_alpha": alpha,
                       f"{prefix}.target_modules": sorted(n.removeprefix("text_model.") for n in modules)})
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(theirs), "nanobooth": json.dumps(ours)}
    file = lora_file(path)
    atomic_write(file, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return file


def write_kohya(path, modules: dict[str, dict[str, dict]], dtype: torch.dtype | None = None,
                renames: dict[str, dict[str, str]] | None = None) -> Path:
    """Write {prefix: {path: {"A", "B", "alpha"}}} as a kohya LoRA file (A, B in `dtype`; alpha float32).
    A file with `text_encoder_2` (SDXL) uses SDXL's prefixes; `renames` {prefix: {path: name}} (SDXL's UNet)."""
    first = next((ab for layers in modules.values() for ab in layers.values()), None)
    if first is None:
        raise ValueError(f"no LoRA weights to write to '{path}'")
    names = KOHYA_SDXL if "text_encoder_2" in modules or "unet" in (renames or {}) else KOHYA
    tensors = {}
    for prefix, layers in modules.items():
        if prefix not in names:
            raise ValueError(f"the kohya format holds LoRAs of {sorted(names)}, not '{prefix}'")
        for name, ab in layers.items():
            if prefix.startswith("text_encoder") and not name.startswith("text_model."):
                name = f"text_model.{name}"  # a diffusers file written with transformers >= 5 lacks the level
            key = names[prefix] + (renames or {}).get(prefix, {}).get(name, name).replace(".", "_")
            for param, x in KOHYA_PARAMS.items():
                value = ab[x].detach().to("cpu", dtype or ab[x].dtype) if x != "alpha" else torch.tensor(float(ab[x]))
                tensors[f"{key}.{param}"] = value.contiguous()
    # kohya's sd-scripts metadata (`ss_*`), which A1111 / ComfyUI show; dim and alpha of the first module
    metadata = {"format": "pt", "ss_network_module": "networks.lora", "ss_network_dim": str(first["A"].shape[0]),
                "ss_network_alpha": f"{float(first['alpha']):g}"}
    path = Path(path)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return path


def save_lora_kohya(path, model, prefix: str = "unet", dtype: torch.dtype | None = None) -> Path:
    """`save_lora` in the kohya / A1111 / ComfyUI layout, to the .safetensors file `path`."""
    models = model if isinstance(model, dict) else {prefix: model}
    modules = model_modules(models, "save_lora_kohya")
    renames = {"unet": sgm_names(models["unet"], modules["unet"])} if is_sdxl_unet(models.get("unet")) else None
    return write_kohya(path, modules, dtype, renames)


def read_lora_file(path) -> tuple[dict, dict]:
    """(tensors, {prefix: alpha}). Files from diffusers' own saver carry alpha only in
    `lora_adapter_metadata`; a file with neither metadata has the scale baked into B (alpha = rank)."""
    file = lora_file(path)
    if not file.is_file():
        raise FileNotFoundError(f"no LoRA file at '{file}'")
    tensors, meta = read_safetensors(file)
    theirs = json.loads(meta.get("lora_adapter_metadata") or "{}")
    alphas = {k.removesuffix(".lora_alpha"): float(v) for k, v in theirs.items() if k.endswith(".lora_alpha")}
    alphas.update({prefix: float(c["alpha"]) for prefix, c in json.loads(meta.get("nanobooth", "{}")).items()})
    return tensors, alphas


def is_kohya(tensors: dict) -> bool:
    return any(k.startswith(tuple(KOHYA_PREFIXES)) for k in tensors)


def diffusers_modules(tensors: dict, alphas: dict, path) -> dict[str, dict[str, dict]]:
    """{prefix: {path: {"A", "B", "alpha"}}} of a diffusers-layout file; alpha per prefix, else the rank."""
    modules = {}
    for key, value in tensors.items():
        prefix, _, rest = key.partition(".")
        name, dot, param = rest.rpartition(".lora_")
        if not dot or param not in ("A.weight", "B.weight"):
            raise ValueError(f"'{key}' in '{path}' is not a `{{prefix}}.{{module}}.lora_A/B.weight` key: only the "
                             f"diffusers/peft and kohya (`lora_unet_...lora_down/up.weight`) LoRA layouts are read")
        modules.setdefault(prefix, {}).setdefault(name, {})[param[0]] = value
    for prefix, layers in modules.items():
        for ab in layers.values():
            if "A" in ab:
                ab["alpha"] = alphas.get(prefix, ab["A"].shape[0])
    return modules


def kohya_modules(tensors: dict, models: dict[str, nn.Module], path) -> dict[str, dict[str, dict]]:
    """The same for a kohya file. `_` stands for both `.` and `_` in its names, so they are matched against
    the models' module names; a module with no `.alpha` has alpha = rank (kohya's default)."""
    modules, lookup = {}, {}
    for key, value in tensors.items():
        lora_name, _, param = key.partition(".")
        start = next((k for k in KOHYA_PREFIXES if lora_name.startswith(k)), None)
        prefix = KOHYA_PREFIXES.get(start)
        if prefix is None or param not in KOHYA_PARAMS:
            raise ValueError(f"'{key}' in '{path}' is not a kohya LoRA key (`lora_unet_` / `lora_te_` / `lora_te1_` / "
                             f"`lora_te2_` + `.lora_down.weight`, `.lora_up.weight`, `.alpha`); LoCon / LoHa / DoRA "
                             f"are not read")
        if prefix not in models:
            raise ValueError(f"'{path}' has LoRA weights for '{prefix}' but models only has {sorted(models)}: "
                             f"pass the '{prefix}' model too")
        if prefix not in lookup:
            lookup[prefix] = {n.replace(".", "_"): n for n, _ in models[prefix].named_modules()}
            if prefix == "unet" and is_sdxl_unet(models[prefix]):   # sd-scripts' SDXL names, too
                attention = [n for n in lookup[prefix].values() if ".attentions." in n]
                lookup[prefix] |= {sgm.replace(".", "_"): n for n, sgm in sgm_names(models[prefix], attention).items()}
        flat = lora_name[len(start):]
        name = lookup[prefix].get(flat)
        if name is None:
            raise ValueError(f"kohya LoRA module '{lora_name}' in '{path}' matches no module of the '{prefix}' model "
                             f"({type(models[prefix]).__name__})")
        entry = modules.setdefault(prefix, {}).setdefault(name, {})
        entry[KOHYA_PARAMS[param]] = float(value) if param == "alpha" else value
    for layers in modules.values():
        for ab in layers.values():
            if "A" in ab:
                ab.setdefault("alpha", float(ab["A"].shape[0]))
    return modules


def check_pairs(modules: dict[str, dict[str, dict]], path) -> None:
    halves = [f"{p}.{n}" for p, layers in modules.items() for n, ab in layers.items() if not {"A", "B"} <= set(ab)]
    if halves:
        raise ValueError(f"'{path}' has lora_A without lora_B or the reverse for {halves[:3]}: a truncated file?")


@torch.no_grad()
def load_lora(path, models: dict[str, nn.Module]) -> dict:
    """Load a LoRA file (diffusers or kohya layout) into {prefix: model}, injecting LoRA layers where a
    model has none yet. Returns {prefix: {"rank", "alpha", "modules"}} (rank and alpha of its first module)."""
    tensors, alphas = read_lora_file(path)
    groups = kohya_modules(tensors, models, path) if is_kohya(tensors) else diffusers_modules(tensors, alphas, path)
    unknown_prefixes = [p for p in groups if p not in models]
    if unknown_prefixes:
        raise ValueError(f"'{path}' has LoRA weights for '{unknown_prefixes[0]}' but models only has {sorted(models)}: "
                         f"pass the '{unknown_prefixes[0]}' model too")
    check_pairs(groups, path)
    info = {}
    for prefix, modules in groups.items():
        model = models[prefix]
        existing = dict(model.named_modules())
        unknown = [n for n in modules if n not in existing]
        if unknown:
            raise ValueError(f"{len(unknown)} LoRA module(s) in '{path}' match no module of the '{prefix}' model "
                             f"({type(model).__name__}), e.g. {unknown[:3]}")
        for name, ab in modules.items():
            layer, rank, alpha = existing[name], ab["A"].shape[0], float(ab["alpha"])
            if not isinstance(layer, LoRALayer):
                layer = wrap(layer, name, rank, alpha)
                replace_module(model, name, layer)
            elif layer.merged or (layer.rank, layer.alpha) != (rank, alpha):
                raise ValueError(f"'{prefix}.{name}' has rank {layer.rank}, alpha {layer.alpha:g}, merged "
                                 f"{layer.merged}; the file needs rank {rank}, alpha {alpha:g}, unmerged")
            # load_state_dict checks the shapes (copy_ would broadcast)
            layer.lora_A.load_state_dict({"weight": ab["A"]})
            layer.lora_B.load_state_dict({"weight": ab["B"]})
        first = next(iter(modules.values()))
        info[prefix] = {"rank": first["A"].shape[0], "alpha": float(first["alpha"]), "modules": sorted(modules)}
    return info


def lora_to_kohya(src, dst, dtype: torch.dtype | None = None) -> Path:
    """Convert a diffusers-layout LoRA file (ours or diffusers') to a kohya file, keeping each alpha."""
    tensors, alphas = read_lora_file(src)
    if is_kohya(tensors):
        raise ValueError(f"'{lora_file(src)}' is already in the kohya layout")
    modules = diffusers_modules(tensors, alphas, src)
    check_pairs(modules, src)
    return write_kohya(dst, modules, dtype)
