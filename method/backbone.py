"""The frozen ImageNet CNN that PatchCore reads its patch features from (Sec. 3.1).

Backbone holds a torchvision classification network up to its deepest used layer (layer2 and
layer3 of WideResNet-50 in the paper: layer4, the pooling and the classifier never run), with
the weights asked for: torchvision's ImageNet weights, a local state_dict file, or random init
for tests. Its forward(images) returns the used layers' feature maps, in the precision the
device computes natively. It also holds the weights' fingerprint, which a memory bank records
so that evaluation can refuse other weights.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
import torchvision

from plumbing.system import cpu_supports, warn_once

WEIGHT_CHOICES = ("imagenet", "auto", "none")  # or a path to a local state_dict file
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class WeightsError(RuntimeError):
    """The backbone weights asked for cannot be had."""


def load_network(name: str, weights: str, seed: int) -> tuple[torch.nn.Module, str, str]:
    """A torchvision classification network with the weights asked for.

    weights: 'imagenet' (torchvision's IMAGENET1K_V1, downloaded and cached), 'none' (random
    init from `seed`, for tests), 'auto' (imagenet, else random init with a warning) or a path
    to a local state_dict file (loaded by Backbone, which knows which keys it uses).
    Returns (network, weights_spec, weights_description); the spec rebuilds the same weights.
    """
    if weights in ("imagenet", "auto"):
        imagenet = torchvision.models.get_model_weights(name).IMAGENET1K_V1
        try:
            return torchvision.models.get_model(name, weights=imagenet), "imagenet", f"imagenet ({imagenet})"
        except OSError as err:  # URLError, HTTP errors and unreadable cache files are OSErrors
            if weights == "imagenet":
                raise WeightsError(
                    f"could not get ImageNet weights for {name} ({err}); on an offline machine pass "
                    "--weights PATH to a state_dict file, or --weights none for random init (tests only)"
                ) from err
            warn_once(f"ImageNet weights for {name} could not be had ({err}); using RANDOM INIT weights. "
                      "Scores will be far below the paper's.")  # fmt: skip
            weights = "none"
    if weights == "none":
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
            torch.manual_seed(seed)
            return torchvision.models.get_model(name, weights=None), "none", f"none (random init, seed {seed})"
    if not Path(weights).is_file():
        raise WeightsError(f"--weights {weights}: no such file; use imagenet, auto, none or the path of a state_dict file")
    return torchvision.models.get_model(name, weights=None), weights, f"file ({weights})"


def resolve_amp(amp: str, device: torch.device) -> str:
    """The backbone precision that runs: `amp` where the device computes it natively, else 'none' (fp32)."""
    if amp == "none":
        return amp
    if device.type == "cuda":  # fp16 on every CUDA GPU; bf16 natively from compute capability 8.0 (Ampere) on, emulated before
        supported = amp == "fp16" or torch.cuda.get_device_capability(device)[0] >= 8
    else:
        supported = cpu_supports(amp)
    if not supported:
        warn_once(f"--amp {amp}: this {device.type.upper()} has no native {amp}; the backbone runs in fp32, which is faster here")
        return "none"
    return amp


def _densenet_keys(state: dict) -> dict:
    """torchvision's published DenseNet checkpoints name layers 'norm.1', not 'norm1': renamed as torchvision renames them."""
    old = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")
    return {(f"{m.group(1)}{m.group(2)}" if (m := old.match(k)) else k): v for k, v in state.items()}


class Backbone(torch.nn.Module):
    """The network cut after the deepest of `layers`, run in order; forward(images) -> the maps of
    `layers` in float32, e.g. [B,512,28,28] and [B,1024,14,14] for 224 px images.

    A layer is a child's name ('layer2') or a dotted path into an nn.Sequential child
    ('features.denseblock3' of DenseNet). The network runs its children in registration order,
    descending into the Sequential that holds a dotted layer, which is what ResNets, WideResNets,
    ResNeXts, VGG and DenseNet's forward() do up to their pooling; everything after the deepest
    used layer is dropped, weights and all. The weights are frozen and the network is in eval
    mode: BatchNorm uses its running statistics.
    """

    def __init__(self, name: str, layers: tuple[str, ...], weights: str, seed: int, device: torch.device, amp: str = "none") -> None:
        super().__init__()
        network, self.weights_spec, self.weights = load_network(name, weights, seed)
        self.name, self.layers = name, tuple(layers)
        every_key = set(network.state_dict())
        self._cut(network, name)
        for child, module in network.named_children():
            self.add_module(child, module)
        if self.weights_spec not in WEIGHT_CHOICES:
            self._load_state_dict_file(self.weights_spec, dropped=every_key - set(self.state_dict()))
        self.sha256 = self.fingerprint()
        self.eval().requires_grad_(False).to(device)
        self.device, self.amp = device, resolve_amp(amp, device)
        if device.type == "cuda":  # NHWC convolutions run faster on tensor cores
            self.to(memory_format=torch.channels_last)

    def _cut(self, network: torch.nn.Module, name: str) -> None:
        """Drop every module after the deepest used layer, in place; self.runs: the paths of the modules that
        run, in order (a Sequential holding a used layer is opened into its children)."""
        runs = []  # (path, module) in the order they run

        def walk(module: torch.nn.Module, prefix: str) -> None:
            for child, sub in module.named_children():
                path = prefix + child
                if any(layer.startswith(path + ".") for layer in self.layers):
                    if not isinstance(sub, torch.nn.Sequential):
                        raise ValueError(f"{name}: the layers inside {path} do not run in order; use {path} itself")
                    walk(sub, path + ".")
                else:
                    runs.append((path, sub))
        walk(network, "")
        names = [path for path, _ in runs]
        unknown = [layer for layer in self.layers if layer not in names]
        if unknown:
            raise ValueError(f"{name} has no layer(s) {unknown}; it has {[n for n, _ in network.named_children()]} (a dotted path such "
                             "as features.denseblock3 reaches inside one)")  # fmt: skip
        last = max(names.index(layer) for layer in self.layers)
        for path, _ in runs[last + 1 :]:  # everything after the deepest used layer goes
            *parents, child = path.split(".")
            holder = network.get_submodule(".".join(parents)) if parents else network
            delattr(holder, child)
        self.runs = [path for path, _ in runs[: last + 1]]

    def _load_state_dict_file(self, path: str, dropped: set[str]) -> None:
        """A torchvision checkpoint of this network; keys of the modules after the last used layer are ignored."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)  # weights_only: never runs pickled code
        except Exception as err:
            raise WeightsError(f"--weights {path}: not a readable state_dict file ({err})") from err
        if not isinstance(state, dict):
            raise WeightsError(f"--weights {path}: holds a {type(state).__name__}, not a state_dict")
        state = _densenet_keys(state) if self.name.startswith("densenet") else state
        used = self.state_dict()
        state = {k: v for k, v in state.items() if k not in dropped}
        for key in used:  # older checkpoints (torchvision's published ones) predate BatchNorm's step counter: unused in eval
            if key.endswith("num_batches_tracked") and key not in state:
                state[key] = used[key]
        missing, unexpected = sorted(set(used) - set(state)), sorted(set(state) - set(used))
        if missing or unexpected:
            raise WeightsError(
                f"--weights {path}: not a state_dict of {self.name} ({len(missing)} missing keys, {len(unexpected)} "
                f"unexpected, e.g. '{(missing or unexpected)[0]}'); use torchvision's {self.name} checkpoint"
            )
        try:
            self.load_state_dict(state, strict=True)
        except RuntimeError as err:  # right keys, wrong shapes
            raise WeightsError(f"--weights {path}: not a state_dict of {self.name} ({str(err).splitlines()[-1].strip()})") from err

    def fingerprint(self) -> str:
        """sha256 of the used weights (names and values): evaluation checks it equals training's."""
        digest = hashlib.sha256()
        for key, value in self.state_dict().items():
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    @torch.no_grad()
    def official_batchnorm_update(self, image_size: int) -> None:
        """As the released code does while it builds its model: it pushes one all-ones image through
        the backbone, still in train mode, to read the feature widths, so every BatchNorm up to the
        last used layer updates its running statistics once (momentum 0.1) before any image is seen.
        Reproduced for --protocol official because it changes every feature (docs/architecture.md)."""
        self.train()
        self._run(torch.ones(1, 3, image_size, image_size, device=self.device))
        self.eval()

    def _run(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        maps = {}
        for path in self.runs:
            x = self.get_submodule(path)(x)
            if path in self.layers:
                maps[path] = x
        return maps

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        images = images.to(self.device, memory_format=torch.channels_last if self.device.type == "cuda" else torch.contiguous_format)
        with torch.autocast(self.device.type, dtype=AMP_DTYPES[self.amp], enabled=self.amp != "none"):
            maps = self._run(images)
        return [maps[name].float().contiguous() for name in self.layers]
