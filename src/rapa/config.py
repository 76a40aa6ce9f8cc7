"""``TrainConfig``: everything a training run depends on (SPEC §3), checked before it starts.

>>> cfg = TrainConfig(dataset="digits", scheme="random", tiles=(16, 4, 1), epochs=2)
>>> cfg.validate()                      # RapaError with the reason if something is wrong
>>> cfg.resolved_lr()                   # 0.025: the paper's rate for a tiled net
>>> TrainConfig.from_dict(cfg.to_dict()) == cfg

``tiles=None`` or ``scheme="none"`` is the untiled net; :meth:`TrainConfig.resolved`
normalises both to ``scheme="none", tiles=None`` and fills in the learning rate, the
device and the canonical dataset name.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import textwrap
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from rapa.errors import RapaError

if TYPE_CHECKING:
    import torch

__all__ = ["CONFIG_VERSION", "LR_TILED", "LR_UNTILED", "META_KEYS", "TrainConfig", "field_docs", "output_pixels",
           "resolve_device"]

CONFIG_VERSION = 1
"""Version of the saved config format; ``from_dict`` refuses any other."""
LR_UNTILED = 0.005
"""The paper's learning rate without tiling (§2.2)."""
LR_TILED = 0.025
"""The paper's learning rate with tiling (§2.2)."""
TRAIN_INITS: tuple[str, ...] = ("caffe", "he", "lsuv")
"""Values of :attr:`TrainConfig.init` (``lsuv`` is data-dependent: the trainer applies it)."""

ANALOG_LR_UNTILED = 0.01
"""Default learning rate of an untiled net on analog arrays (``analog`` set; README)."""
ANALOG_LR_TILED = 0.02
"""Default learning rate of a tiled net on analog arrays (``analog`` set; README): twice the
untiled rate, as the paper trains tiled nets at a higher rate (§2.2: each replica gets a
fraction of the updates); at 0.01 the tiled RPU net lagged its FP twin by up to 8.5 pp.
(A per-layer rate, :attr:`TrainConfig.tile_lr_power`, is an option, not the default: README.)"""
ANALOG_INIT = "lsuv"
"""Default initialisation on analog arrays (``analog`` set): He, then LSUV-rescaled (README:
at the short Fashion-MNIST budget, seeds 0-2, it halves the tiled net's mean RPU - FP gap against He alone)."""
ANALOG_TILE_INIT = "replicate"
"""Default start of a tiled net's kernel replicas on analog arrays (``analog`` set): one draw
copied into every tile (README: with independent draws the replicas of the random scheme stay
unalike, similarity near 0, and the tiled net lagged the untiled one in FP and more on arrays)."""
META_KEYS: tuple[str, ...] = ("torch_version", "rapa_version")
"""Keys a run's config.json carries besides the fields (ignored by ``from_dict``)."""


@dataclass
class TrainConfig:
    """A training run of the paper's ConvNet: data, network, SGD recipe, evaluation."""

    dataset: str = "digits"
    """Dataset name (``rapa.data.DATASETS``): cifar10, cifar100, svhn, fashion-mnist, digits."""
    data_dir: str | None = None
    """Folder searched first for the dataset's files (None: the cache only)."""
    download: bool = False
    """Fetch missing dataset files (never done otherwise)."""
    scheme: str = "random"
    """Tiling scheme (``rapa.SCHEMES``); ``none`` is the untiled net."""
    tiles: tuple[int, ...] | None = (16, 4, 1)
    """Tiles per conv layer ``(nt1, nt2, nt3)``; None: untiled."""
    channels: tuple[int, ...] = (32, 32, 64)
    """Output channels of the three conv layers; ``(54, 64, 64)`` is the enlarged net."""
    pooling: str = "max"
    """Kind of pool1 and pool2: max, avg, stochastic, mixed."""
    epochs: int = 10
    """Training epochs."""
    batch_size: int = 10
    """Minibatch size (the paper: 10)."""
    lr: float | None = None
    """Learning rate; None: 0.005 untiled, 0.025 tiled (the paper's), or with ``analog`` 0.01 untiled, 0.02 tiled."""
    warmup_epochs: int = 1
    """Epochs at the start run at ``lr / warmup_divisor`` (the paper: 1 or 5)."""
    warmup_divisor: float = 20.0
    """Learning-rate reduction during warm-up (the paper: 20)."""
    lr_step: int = 25
    """Step decay: the rate is multiplied by ``gamma`` every ``lr_step`` epochs (25, 100, 300)."""
    gamma: float = 0.1
    """Step decay factor."""
    weight_decay: float | None = 1e-4
    """Torch SGD's ``weight_decay``: every step shrinks a weight by ``lr * weight_decay * w``
    (Caffe's ``weight_decay: 0.0001``, the paper's "0.0001 times the learning rate", SPEC §3)."""
    wd_factor: float | None = None
    """Legacy (runs made before ``weight_decay``): torch's weight decay was ``wd_factor * lr``,
    so the shrink per step was ``lr * wd_factor * lr * w``. Kept so that old runs load and resume
    as they trained; new configs leave it None."""
    momentum: float = 0.0
    """SGD momentum (the paper: plain SGD, 0)."""
    augment: str = "none"
    """Augmentation: none, moderate (mirror + brightness), strong (scale + crop, the '+' sets)."""
    mirror: bool | None = None
    """Random mirroring in augmentation; None: the dataset's default (off for digits)."""
    seed: int = 0
    """Seed of the initialisation, the tile assignments and the data order/augmentation."""
    device: str = "auto"
    """auto (CUDA when available), cpu, cuda or cuda:N."""
    limit_train: int | None = None
    """Use only the first N training images (None: all)."""
    limit_test: int | None = None
    """Use only the first N test images (None: all)."""
    votes: int = 9
    """Predictions per test image for the final majority vote (the paper: 9)."""
    adaptive_threshold: float = 0.9
    """Adaptive voting: images whose first softmax maximum reaches this get no extra passes."""
    eval_batch_size: int = 500
    """Images per forward pass in evaluation."""
    eval_every: int = 1
    """Measure the test error every this many epochs (and always after the last)."""
    analog: str | None = None
    """Train on simulated analog arrays (needs ``rapa[analog]``) with this preset: rpu-baseline (the
    paper's device), idealized, ideal or aihwkit:CLASS; None: digital. Its recipe defaults ``init``
    to lsuv, ``tile_init`` to replicate and ``lr`` to the analog learning rates."""
    digital_layers: tuple[str, ...] = ()
    """With ``analog``: layers kept in floating point, among conv1, conv2, conv3 and fc (e.g. fc,
    as analog studies often keep the last layer digital); the others on arrays. Empty (the
    default): every layer analog."""
    analog_options: tuple[str, ...] = ()
    """With ``analog``: fields of the preset set to other values, as ``FIELD=VALUE`` for every
    array (e.g. desired_bl=100 for pulse trains of up to 100 pulses, out_noise=0 for noiseless
    reads; the fields are listed in rapa.analog.presets) or ``LAYER.FIELD=VALUE`` for one
    layer's arrays (e.g. conv1.dw_min=0.0001; it wins over a common value); saved in
    config.json, so resumed and reloaded runs rebuild the same arrays. Empty (the default): the
    preset as it is."""
    tile_lr_power: float = 0.0
    """Per-layer rate: every conv layer with nk > 1 kernel replicas learns at ``lr * nk**p`` (the
    paper, §2.2: "the number of updates is effectively reduced per array tile, which can be in
    part compensated by increasing the learning rate"); 0 (the default): one rate for the whole
    net; 0.5: conv1 of (16,4,1) at 4x, conv2 at 2x; 1: each replica steps as far per image as the
    untiled kernel. Untiled layers and the FC layer keep ``lr``."""
    layer_lr_scale: tuple[str, ...] = ()
    """Per-layer rate factors as ``LAYER=FACTOR`` (LAYER among conv1, conv2, conv3, fc; FACTOR > 0),
    on top of ``tile_lr_power``: e.g. fc=0.5 trains the FC layer at half the rate. Empty (the
    default): no factors."""
    init: str | None = None
    """Initialisation: caffe (the paper's, std 1e-4/0.01, SPEC §2), he (``sqrt(2/fan_in)``) or
    lsuv (he, then every layer rescaled to unit output variance on the first
    :data:`rapa.lsuv.LSUV_IMAGES` training images, :func:`rapa.lsuv.lsuv_`); None: caffe, or lsuv
    with ``analog`` (the analog recipe)."""
    tile_init: str | None = None
    """How a tiled layer's kernel replicas start: independent (each tile its own draw of ``init``)
    or replicate (one draw copied into every tile: the net starts as the untiled one, and the
    random scheme keeps the replicas alike); None: independent, or replicate with ``analog``
    (the analog recipe; README)."""
    version: int = CONFIG_VERSION
    """Format version of this config (of a run's config.json; not a setting: ``rapa train`` has
    no option for it)."""

    def __post_init__(self) -> None:
        # JSON gives lists; keep tuples so that configs compare equal after a round trip
        if isinstance(self.tiles, list):
            self.tiles = tuple(self.tiles)
        if isinstance(self.channels, list):
            self.channels = tuple(self.channels)
        if isinstance(self.digital_layers, list):
            self.digital_layers = tuple(self.digital_layers)
        if isinstance(self.analog_options, list):
            self.analog_options = tuple(self.analog_options)
        if isinstance(self.layer_lr_scale, list):
            self.layer_lr_scale = tuple(self.layer_lr_scale)

    # ----------------------------------------------------------------- derived values

    @property
    def tiled(self) -> bool:
        """Whether the net has more than one kernel matrix somewhere (or perforation)."""
        return self.scheme != "none" and self.tiles is not None and any(t != 1 for t in self.tiles)

    def layer_lr_scales(self) -> dict[str, float]:
        """``layer_lr_scale`` as ``{"fc": 0.5, ...}``; RapaError, one line naming the item and
        what to give, for a malformed item, an unknown or repeated layer, or a factor that is
        not a finite number > 0."""
        from rapa.models import LAYER_NAMES

        if not isinstance(self.layer_lr_scale, tuple):
            raise RapaError(f"layer_lr_scale={self.layer_lr_scale!r}: give LAYER=FACTOR strings")
        out: dict[str, float] = {}
        for item in self.layer_lr_scale:
            name, sep, text = str(item).partition("=")
            name = name.strip()
            if not sep or name not in LAYER_NAMES:
                raise RapaError(f"layer_lr_scale item {item!r}: give LAYER=FACTOR with LAYER among "
                                f"{', '.join(LAYER_NAMES)}, e.g. fc=0.5")
            if name in out:
                raise RapaError(f"layer_lr_scale item {item!r}: {name} is given twice")
            try:
                value = float(text)
            except ValueError:
                value = math.nan
            if not math.isfinite(value) or value <= 0:
                raise RapaError(f"layer_lr_scale item {item!r}: the factor must be a finite number > 0")
            out[name] = value
        return out

    def resolved_lr(self) -> float:
        """``lr``, or the default for a tiled / untiled net: the paper's (0.025 / 0.005), or
        with ``analog`` the analog recipe's (:data:`ANALOG_LR_TILED` / :data:`ANALOG_LR_UNTILED`)."""
        if self.lr is not None:
            return float(self.lr)
        if self.analog is not None:
            return ANALOG_LR_TILED if self.tiled else ANALOG_LR_UNTILED
        return LR_TILED if self.tiled else LR_UNTILED

    def resolved_init(self) -> str:
        """``init``, or the default: :data:`ANALOG_INIT` (lsuv) with ``analog`` (the analog
        recipe), else ``caffe``."""
        if self.init is not None:
            return self.init
        return ANALOG_INIT if self.analog is not None else "caffe"

    def resolved_tile_init(self) -> str:
        """``tile_init``, or the default: :data:`ANALOG_TILE_INIT` (replicate) with ``analog``
        (the analog recipe), else ``independent``."""
        if self.tile_init is not None:
            return self.tile_init
        return ANALOG_TILE_INIT if self.analog is not None else "independent"

    def resolved_weight_decay(self) -> float:
        """Torch's ``weight_decay`` for this run: ``weight_decay``, or ``wd_factor * lr`` for a
        legacy config (:attr:`wd_factor` set)."""
        if self.wd_factor is not None:
            return float(self.wd_factor) * self.resolved_lr()
        return float(self.weight_decay or 0.0)

    def resolved(self) -> "TrainConfig":
        """A validated copy with lr, device and dataset name filled in, untiled nets normalised."""
        self.validate()
        from rapa.data import canonical_name

        untiled = self.scheme == "none" or self.tiles is None
        return dataclasses.replace(
            self,
            dataset=canonical_name(self.dataset),
            scheme="none" if untiled else self.scheme,
            tiles=None if untiled or self.tiles is None else tuple(self.tiles),
            channels=tuple(self.channels),
            lr=self.resolved_lr(),
            init=self.resolved_init(),
            tile_init=self.resolved_tile_init(),
            device=str(resolve_device(self.device)),
        )

    # ------------------------------------------------------------------- validation

    def validate(self, check_device: bool = True) -> None:
        """Raise :class:`RapaError` with the reason if this config cannot train
        (``check_device=False``: a saved run's device need not exist on this machine)."""
        from rapa import schemes
        from rapa.data import KINDS, canonical_name, dataset_info
        from rapa.models import LAYER_NAMES, check_tiles_fit
        from rapa.pooling import POOL_KINDS
        from rapa.tiled_conv import TILE_INITS

        try:
            name = canonical_name(self.dataset)
        except ValueError as exc:
            raise RapaError(str(exc)) from None
        if self.scheme not in schemes.SCHEMES:
            raise RapaError(f"unknown scheme {self.scheme!r}; choose one of {', '.join(schemes.SCHEMES)}")
        if self.pooling not in POOL_KINDS:
            raise RapaError(f"unknown pooling {self.pooling!r}; choose one of {', '.join(POOL_KINDS)}")
        if self.augment not in KINDS:
            raise RapaError(f"unknown augmentation {self.augment!r}; choose one of {', '.join(KINDS)}")
        _check_ints("channels", self.channels, 3)
        if self.tiles is not None:
            _check_ints("tiles", self.tiles, 3)
            if self.scheme != "none":
                try:  # the net decides whether its tiles fit
                    check_tiles_fit(self.tiles, self.scheme, dataset_info(name).size, name)
                except ValueError as exc:
                    raise RapaError(str(exc)) from None
        for key, low in (("epochs", 1), ("batch_size", 1), ("warmup_epochs", 0), ("lr_step", 1),
                         ("votes", 1), ("eval_batch_size", 1), ("eval_every", 1)):
            _check_int(key, getattr(self, key), low)
        for key in ("limit_train", "limit_test"):
            if getattr(self, key) is not None:
                _check_int(key, getattr(self, key), 1)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise RapaError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.lr is not None and not (_is_number(self.lr) and self.lr > 0 and math.isfinite(self.lr)):
            raise RapaError(f"lr must be a positive number, got {self.lr!r}")
        if self.wd_factor is not None and self.weight_decay is not None:
            raise RapaError(f"weight_decay={self.weight_decay!r} and the legacy wd_factor={self.wd_factor!r} are "
                            "both set; give weight_decay only (torch's weight decay, e.g. 1e-4)")
        for key in ("weight_decay", "wd_factor"):
            value = getattr(self, key)
            if value is not None and (not _is_number(value) or not 0 <= value < math.inf):
                raise RapaError(f"{key}={value!r} is out of range (a number >= 0)")
        for key, ok in (("gamma", lambda v: v > 0),
                        ("momentum", lambda v: 0 <= v < 1), ("warmup_divisor", lambda v: v > 0),
                        ("adaptive_threshold", lambda v: 0 <= v <= 1)):
            value = getattr(self, key)
            if not _is_number(value) or not ok(value):
                raise RapaError(f"{key}={value!r} is out of range")
        if self.mirror not in (None, True, False):
            raise RapaError(f"mirror must be true, false or null, got {self.mirror!r}")
        if self.analog is not None and (not isinstance(self.analog, str) or not self.analog):
            raise RapaError(f"analog must be a preset name or None, got {self.analog!r}")
        if self.analog is not None:
            from rapa.analog.presets import get_preset

            get_preset(self.analog)  # RapaError naming an unknown preset (aihwkit classes: at conversion)
        if not isinstance(self.digital_layers, tuple) or any(n not in LAYER_NAMES for n in self.digital_layers):
            raise RapaError(f"digital_layers={self.digital_layers!r}: give layer names among {', '.join(LAYER_NAMES)}")
        if not isinstance(self.analog_options, tuple) or any(not isinstance(o, str) for o in self.analog_options):
            raise RapaError(f"analog_options={self.analog_options!r}: give FIELD=VALUE strings")
        if self.analog_options and self.analog is None:
            raise RapaError(f"analog_options={','.join(self.analog_options)} needs analog (a preset to change)")
        if self.analog_options:
            from rapa.analog.presets import layer_options

            for layer in layer_options(self.analog, self.analog_options):  # RapaError naming a bad field or value
                if not layer:  # the fields of every array
                    continue
                item = next((o for o in self.analog_options if o.strip().startswith(f"{layer}.")), layer)
                if layer not in LAYER_NAMES:
                    raise RapaError(f"analog option {item!r}: the net has no layer {layer!r}; give LAYER.FIELD=VALUE "
                                    f"with LAYER among {', '.join(LAYER_NAMES)}")
                if layer in self.digital_layers:
                    raise RapaError(f"analog option {item!r}: layer {layer} is digital (digital_layers); "
                                    f"drop its options or the layer from digital_layers")
        if self.digital_layers and self.analog is None:
            raise RapaError(f"digital_layers={','.join(self.digital_layers)} needs analog (a preset): "
                            "without it every layer is digital already")
        if not _is_number(self.tile_lr_power) or not 0 <= self.tile_lr_power <= 2:
            raise RapaError(f"tile_lr_power={self.tile_lr_power!r} is out of range: give a number from 0 to 2 "
                            "(0: one rate; 0.5: sqrt(nk) times the rate; 1: nk times)")
        self.layer_lr_scales()  # RapaError naming a bad item
        if self.tile_init is not None and self.tile_init not in TILE_INITS:
            raise RapaError(f"unknown tile_init {self.tile_init!r}; choose one of {', '.join(TILE_INITS)}")
        if self.init is not None and self.init not in TRAIN_INITS:
            raise RapaError(f"unknown init {self.init!r}; choose one of {', '.join(TRAIN_INITS)}")
        if self.version != CONFIG_VERSION:
            raise RapaError(f"config version {self.version!r} is not supported (this rapa reads {CONFIG_VERSION})")
        if not isinstance(self.device, str):
            raise RapaError(f"device must be a name like cpu or cuda, got {self.device!r}")
        if check_device:
            device = resolve_device(self.device)
            if self.analog is not None and device.type == "cuda":
                from rapa.analog.backend import check_device as check_analog_device

                check_analog_device(device)

    # ------------------------------------------------------------------------- JSON

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field (tuples become lists)."""
        out = dataclasses.asdict(self)
        for key in ("tiles", "channels"):
            if out[key] is not None:
                out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        """The config of a dict made by :meth:`to_dict` (a run's config.json).

        Refuses another ``version`` and unknown keys with a :class:`RapaError`; the
        metadata keys of a run (:data:`META_KEYS`) are ignored. A config saved before
        ``weight_decay`` existed (``wd_factor`` only) keeps its weight decay ``wd_factor * lr``.
        """
        if not isinstance(data, Mapping):
            raise RapaError(f"a config must be a JSON object, got {type(data).__name__}")
        version = data.get("version")
        if version != CONFIG_VERSION:
            raise RapaError(f"config version {version!r} is not supported (this rapa reads version "
                            f"{CONFIG_VERSION}); retrain with this version")
        names = {f.name for f in dataclasses.fields(cls)}
        if "wd_factor" in data and "weight_decay" not in data:  # a run made before weight_decay existed
            data = {**data, "weight_decay": None}
        if "init" not in data:  # a run made before init existed: Caffe's
            data = {**data, "init": "caffe"}
        if "tile_init" not in data:  # a run made before tile_init existed: independent tiles
            data = {**data, "tile_init": "independent"}
        unknown = sorted(set(data) - names - set(META_KEYS))
        if unknown:
            raise RapaError(f"unknown config key(s) {unknown}")
        return cls(**{k: v for k, v in data.items() if k in names})


def field_docs(cls: type = TrainConfig) -> dict[str, str]:
    """The docstring under each field of the dataclass ``cls`` (the string literal that follows
    the field's line in its source), by field name; ``""`` for a field without one.

    ``rapa train`` builds its options' help from these, so each field is documented once.
    """
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # no source (a frozen build): no help texts, the options stay
        return {f.name: "" for f in dataclasses.fields(cls)}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, after in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            doc = ""
            if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) \
                    and isinstance(after.value.value, str):
                doc = inspect.cleandoc(after.value.value)
            docs[node.target.id] = doc
    return {f.name: docs.get(f.name, "") for f in dataclasses.fields(cls)}


def output_pixels(size: int) -> tuple[int, int, int]:
    """``np`` of the three conv layers of the paper's net on ``size x size`` inputs
    (:func:`rapa.models.output_pixels`): 32 -> (1024, 256, 64), 28 -> (784, 196, 49)."""
    from rapa.models import output_pixels as net_output_pixels  # torch: loaded on use only

    return net_output_pixels(size)


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; RapaError for an unusable name."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise RapaError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise RapaError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RapaError(f"device {device!r} asked for, but CUDA is not available; use --device cpu")
    return dev


def _fmt(tiles: Any) -> str:
    return ",".join(str(t) for t in tiles)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise RapaError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_ints(name: str, value: Any, length: int) -> None:
    try:
        items = tuple(value)
    except TypeError:
        raise RapaError(f"{name} must be {length} positive integers, got {value!r}") from None
    if len(items) != length:
        raise RapaError(f"{name} must be {length} numbers (one per conv layer), got {len(items)}: {_fmt(items)}")
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in items):
        raise RapaError(f"{name} must be positive integers, got {_fmt(items)}")

