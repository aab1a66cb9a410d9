"""Recipes: declarative, validated descriptions of a model (pydantic v2), the same as YAML on disk.

A recipe names its mixers once (``mixers: {m: {kind: ssd, ...}, a: {kind: attention, ...}}``) and says
which one each layer uses with a ``pattern``, in any of these forms, all normalised to one explicit list
(``recipe.layers``):

- an explicit list:           ``[m, m, a, m]``
- a pattern string:           ``"m*3 a"``, groups ``"(m*3 a)*4"``, or one letter per layer ``"mmma"``
- a default with overrides:   ``{default: m, at: {9: a, 18: a}}``           (Bamba's attn_layer_indices)
- a default with a period:    ``{default: m, every: 8, offset: 4, use: a}``  (Jamba's period/offset)

A ``parallel`` mixer runs several named mixers side by side on the same normed input and sums their
outputs (Falcon-H1 style). Any mix of kinds is allowed.

The shipped recipes (``recipes/*.yaml`` in the repository, package data ``ssmblocks/recipes`` when
installed) load by name: ``Recipe.from_name("mamba2-130m")``; ``Recipe.names()`` lists them.

Sizes have upper limits, so that a typo or a hostile file is refused by name before anything is allocated:
vocab_size <= MAX_VOCAB (2**22), widths (d_model, hidden_dim, dt_rank) <= MAX_WIDTH (2**17), n_layers and
pattern lengths <= MAX_LAYERS (2**12), per-head sizes and head counts <= MAX_HEAD (2**12). YAML is read
with at most MAX_YAML_NODES values after aliases are expanded (an alias bomb is refused, not expanded).
"""

from __future__ import annotations

import difflib
import math
import os
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PositiveFloat,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .errors import read_regular

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_VOCAB = 2**22
MAX_WIDTH = 2**17
MAX_LAYERS = 2**12
MAX_HEAD = 2**12
MAX_YAML_NODES = 100_000
MAX_ERRORS_SHOWN = 20
MAX_RECIPE_BYTES = 16 * 2**20


def _size(limit: int):
    """A positive int of at most ``limit``."""
    return Annotated[int, Field(gt=0, le=limit)]


Width = _size(MAX_WIDTH)
HeadSize = _size(MAX_HEAD)


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SelectiveSSMSpec(_Spec):
    """Mamba1 mixer (ssmblocks.SelectiveSSM)."""

    kind: Literal["selective_ssm"] = Field(description="selective_ssm: Mamba1's mixer")
    d_state: HeadSize = Field(16, description="state size n per channel")
    d_conv: _size(1024) = Field(4, description="causal conv width k")
    expand: _size(64) = Field(2, description="inner width e = expand * d_model")
    dt_rank: Width | Literal["auto"] = Field("auto", description="rank of the dt projection; auto = ceil(d_model / 16)")
    dt_min: PositiveFloat = Field(0.001, description="smallest initial dt (dt_proj's bias is drawn log-uniform)")
    dt_max: PositiveFloat = Field(0.1, description="largest initial dt")
    dt_init_floor: PositiveFloat = Field(1e-4, description="initial dt is at least this")
    conv_bias: bool = Field(True, description="bias in the causal conv")
    bias: bool = Field(False, description="bias in in_proj and out_proj")


class SSDSpec(_Spec):
    """Mamba2 mixer (ssmblocks.SSD)."""

    kind: Literal["ssd"] = Field(description="ssd: Mamba2's mixer")
    d_state: HeadSize = Field(128, description="state size n per head")
    d_conv: _size(1024) = Field(4, description="causal conv width k")
    expand: _size(64) = Field(2, description="inner width e = expand * d_model")
    head_dim: HeadSize = Field(64, description="head size p; heads h = e / p")
    n_groups: HeadSize = Field(1, description="groups of B and C, each shared by heads / n_groups heads")
    chunk_size: _size(2**16) | None = Field(
        None, description="chunk of the chunked scan; null: each implementation's own. Never changes results"
    )
    dt_min: PositiveFloat = Field(0.001, description="smallest initial dt (dt_bias is drawn log-uniform)")
    dt_max: PositiveFloat = Field(0.1, description="largest initial dt")
    dt_init_floor: PositiveFloat = Field(1e-4, description="initial dt is at least this")
    dt_limit: tuple[float, float] = Field((0.0, math.inf), description="(low, high) clamp of dt after softplus")
    D_has_hdim: bool = Field(False, description="skip weight D per channel (h * p values) instead of per head")
    norm_before_gate: bool = Field(False, description="gated norm: norm(x) * silu(z) instead of norm(x * silu(z))")
    norm_eps: PositiveFloat = Field(1e-5, description="epsilon of the gated RMS norm")
    conv_bias: bool = Field(True, description="bias in the causal conv")
    bias: bool = Field(False, description="bias in in_proj and out_proj")


class AttentionSpec(_Spec):
    """Causal grouped-query attention with RoPE (ssmblocks.Attention)."""

    kind: Literal["attention"] = Field(description="attention: causal grouped-query attention with RoPE")
    n_heads: HeadSize = Field(description="query heads")
    n_kv_heads: HeadSize | None = Field(None, description="key/value heads; None = n_heads")
    head_dim: HeadSize | None = Field(None, description="None = d_model / n_heads")
    rope_theta: PositiveFloat = Field(10000.0, description="RoPE base")
    rotary_fraction: float = Field(1.0, ge=0.0, le=1.0, description="share of each head's dims that RoPE rotates")
    bias: bool = Field(False, description="bias in q_proj, k_proj, v_proj and o_proj")


class ParallelSpec(_Spec):
    """Several named mixers on the same normed input, outputs summed (Falcon-H1 style)."""

    kind: Literal["parallel"] = Field(description="parallel: named mixers side by side, outputs summed")
    mixers: list[str] = Field(min_length=2, description="names of other (non-parallel) mixers of this recipe")


MixerSpec = Annotated[SelectiveSSMSpec | SSDSpec | AttentionSpec | ParallelSpec, Field(discriminator="kind")]


class SwiGLUSpec(_Spec):
    """SwiGLU MLP (ssmblocks.SwiGLU)."""

    kind: Literal["swiglu"] = Field("swiglu", description="swiglu, the one MLP kind")
    hidden_dim: Width = Field(description="hidden units of gate_proj and up_proj")
    bias: bool = Field(False, description="bias in gate_proj, up_proj and down_proj")


class NormSpec(_Spec):
    """The norm before each mixer and MLP and after the last block (ssmblocks.RMSNorm)."""

    kind: Literal["rmsnorm"] = Field("rmsnorm", description="rmsnorm, the one norm kind")
    eps: PositiveFloat = Field(1e-5, description="epsilon added to the mean square")


class PatternOverrides(_Spec):
    """Every layer uses ``default`` except the layers listed in ``at`` (index -> mixer)."""

    default: str = Field(description="the mixer of every layer not in at")
    at: dict[int, str] = Field(default_factory=dict, description="layer index -> mixer name")


class PatternPeriodic(_Spec):
    """Layer i uses ``use`` when i % every == offset, else ``default``."""

    default: str = Field(description="the mixer of the other layers")
    every: _size(MAX_LAYERS) = Field(description="the period")
    offset: int = Field(0, ge=0, description="the layer within each period that uses use")
    use: str = Field(description="the mixer of layers i with i % every == offset")

    @model_validator(mode="after")
    def _offset_below_period(self):
        if self.offset >= self.every:
            raise ValueError(f"offset={self.offset} must be smaller than every={self.every}")
        return self


def _pattern_form(value) -> str:
    if isinstance(value, str | list):
        return type(value).__name__
    if isinstance(value, dict):
        return "periodic" if "every" in value or "use" in value else "overrides"
    return "periodic" if isinstance(value, PatternPeriodic) else "overrides"


Pattern = Annotated[
    Annotated[str, Tag("str")]
    | Annotated[list[str], Tag("list")]
    | Annotated[PatternOverrides, Tag("overrides")]
    | Annotated[PatternPeriodic, Tag("periodic")],
    Discriminator(_pattern_form),
]


class Recipe(_Spec):
    """A whole causal LM: embedding -> n_layers pre-norm residual blocks -> final norm -> LM head."""

    name: str = Field(description="a name for humans")
    vocab_size: _size(MAX_VOCAB) = Field(description="tokens of the embedding and LM head")
    pad_vocab_size_multiple: _size(2**16) = Field(1, description="embedding rows are padded up to a multiple")
    d_model: Width = Field(description="model width d")
    n_layers: _size(MAX_LAYERS) = Field(description="blocks; the pattern must give this many layers")
    tie_embeddings: bool = Field(True, description="the LM head shares the embedding's weight")
    residual_in_fp32: bool = Field(True, description="keep the residual stream in float32")
    norm: NormSpec = Field(default_factory=NormSpec, description="the norm of every block and the final norm")
    mixers: dict[str, MixerSpec] = Field(min_length=1, description="named mixer specs that the pattern uses")
    mlp: SwiGLUSpec | None = Field(None, description="MLP after each mixer; null = Mamba-style blocks")
    pattern: Pattern = Field(description="which mixer each layer uses: a list, a string or a mapping (see below)")

    @field_validator("mixers")
    @classmethod
    def _mixer_names(cls, mixers: dict) -> dict:
        for name in mixers:
            if not _NAME.fullmatch(name):
                raise ValueError(f"mixer name {name!r} must be an identifier (letters, digits, _)")
        return mixers

    @model_validator(mode="after")
    def _check(self):
        for name, spec in self.mixers.items():
            _check_mixer(f"mixers.{name}", spec, self.d_model, self.mixers)
        layers = self.layers
        if len(layers) != self.n_layers:
            raise ValueError(f"pattern gives {len(layers)} layers, but n_layers={self.n_layers}")
        return self

    @property
    def layers(self) -> list[str]:
        """The mixer name of every layer, in order."""
        return expand_pattern(self.pattern, self.mixers, self.n_layers)

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return -(-self.vocab_size // m) * m

    @classmethod
    def from_yaml(cls, path_or_text: str | Path) -> Recipe:
        """Load from a YAML file path or from YAML text. A one-line string is a path when such a file exists
        or when it reads like one (a '/' or a file suffix, no ':'); it is YAML text otherwise."""
        text = str(path_or_text)
        if isinstance(path_or_text, Path) or _names_a_file(text):
            if not Path(text).exists():
                raise FileNotFoundError(f"recipe file {text!r} does not exist")
            data = read_regular(Path(text), MAX_RECIPE_BYTES, ValueError)
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"recipe file {str(path_or_text)!r} is not UTF-8 text ({e})") from None
        return cls.from_yaml_text(text)

    @classmethod
    def from_yaml_text(cls, text: str) -> Recipe:
        """Load from YAML text; more than MAX_YAML_NODES values (aliases expanded) is refused unexpanded."""
        data = yaml.safe_load(text)
        _check_yaml_size(data)
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise _first_errors(e) from None

    @classmethod
    def names(cls) -> list[str]:
        """The names of the shipped recipes, sorted: what ``from_name`` accepts."""
        return sorted(path.stem for path in shipped_folder().glob("*.yaml"))

    @classmethod
    def from_name(cls, name: str) -> Recipe:
        """A shipped recipe by name (``"mamba2-130m"``, see ``names()``); an unknown name is a ValueError
        that lists the close matches, or every name when none is close."""
        names = cls.names()
        if name not in names:
            close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}?" if close else f"shipped: {', '.join(names)}"
            raise ValueError(f"unknown recipe name {name!r}; {hint}")
        return cls.from_yaml(shipped_folder() / f"{name}.yaml")

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_defaults=True)
        data = {"name": self.name, **data}
        return yaml.safe_dump(data, sort_keys=False)


def shipped_folder() -> Path:
    """The folder of the shipped recipes: ``ssmblocks/recipes`` in an installed wheel, else ``recipes/``
    beside the package in a source checkout (and an editable install)."""
    installed = Path(__file__).parent / "recipes"
    return installed if installed.is_dir() else Path(__file__).parents[1] / "recipes"


def _names_a_file(text: str) -> bool:
    if "\n" in text or not text.strip():
        return False
    try:
        if Path(text).exists():
            return True
    except (OSError, ValueError):  # too long or not a valid path: YAML text
        return False
    return ":" not in text and ("/" in text or os.sep in text or re.search(r"\.[A-Za-z]\w{0,4}$", text) is not None)


def _check_yaml_size(data) -> None:
    """Count the values of parsed YAML as the schema would see them (each alias use again, cycles endlessly)
    and stop at MAX_YAML_NODES."""
    stack, seen = [data], 0
    while stack:
        value = stack.pop()
        seen += 1
        if seen > MAX_YAML_NODES:
            raise ValueError(
                f"recipe YAML has more than {MAX_YAML_NODES:,} values once its aliases are expanded "
                "(an alias bomb or a cycle?); refused"
            )
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


def _first_errors(error: ValidationError) -> ValidationError:
    """The error itself if it lists at most MAX_ERRORS_SHOWN problems, else one with the first of them and a
    count of the rest (a message of bounded size)."""
    if error.error_count() <= MAX_ERRORS_SHOWN:
        return error
    keys = ("type", "loc", "input", "ctx")
    shown = [{k: e[k] for k in keys if k in e} for e in error.errors(include_url=False)[:MAX_ERRORS_SHOWN]]
    rest = error.error_count() - MAX_ERRORS_SHOWN
    more = PydanticCustomError("too_many_errors", "and {rest} more errors, not shown", {"rest": rest})
    return ValidationError.from_exception_data(error.title, [*shown, {"type": more, "loc": (), "input": "..."}])


def _check_mixer(path: str, spec, d_model: int, mixers: dict) -> None:
    if isinstance(spec, AttentionSpec):
        kv = spec.n_kv_heads or spec.n_heads
        if spec.n_heads % kv:
            raise ValueError(f"{path}.n_kv_heads={kv} must divide {path}.n_heads={spec.n_heads}")
        if spec.head_dim is None and d_model % spec.n_heads:
            raise ValueError(f"{path}.n_heads={spec.n_heads} must divide d_model={d_model} (or set {path}.head_dim)")
    elif isinstance(spec, SSDSpec):
        inner = spec.expand * d_model
        if inner % spec.head_dim:
            raise ValueError(f"{path}.head_dim={spec.head_dim} must divide expand * d_model = {inner}")
        if (inner // spec.head_dim) % spec.n_groups:
            raise ValueError(
                f"{path}.n_groups={spec.n_groups} must divide the number of heads {inner // spec.head_dim}"
            )
        if spec.dt_limit[0] < 0 or spec.dt_limit[0] > spec.dt_limit[1]:
            raise ValueError(f"{path}.dt_limit={spec.dt_limit} must be (low, high) with 0 <= low <= high")
    elif isinstance(spec, ParallelSpec):
        for i, member in enumerate(spec.mixers):
            if member in spec.mixers[:i]:
                raise ValueError(f"{path}.mixers[{i}]={member!r} is listed twice")
            if member not in mixers:
                raise ValueError(f"{path}.mixers[{i}]={member!r} is not a mixer of this recipe ({sorted(mixers)})")
            if isinstance(mixers[member], ParallelSpec):
                raise ValueError(f"{path}.mixers[{i}]={member!r} is itself parallel; nest mixers one level only")
    if not isinstance(spec, ParallelSpec) and hasattr(spec, "dt_min") and spec.dt_min > spec.dt_max:
        raise ValueError(f"{path}.dt_min={spec.dt_min} must not exceed {path}.dt_max={spec.dt_max}")


def expand_pattern(pattern: Pattern, mixers: dict, n_layers: int) -> list[str]:
    """Normalise any pattern form into one mixer name per layer; errors name the bad entry."""

    def known(name: str, where: str) -> str:
        if name not in mixers:
            raise ValueError(f"{where} names mixer {name!r}, which is not defined in mixers ({sorted(mixers)})")
        return name

    if isinstance(pattern, str):
        return _parse_pattern_string(pattern, mixers, known)
    if isinstance(pattern, list):
        return [known(name, f"pattern[{i}]") for i, name in enumerate(pattern)]
    if isinstance(pattern, PatternOverrides):
        layers = [known(pattern.default, "pattern.default")] * n_layers
        for i, name in sorted(pattern.at.items()):
            if not 0 <= i < n_layers:
                raise ValueError(f"pattern.at has layer index {i}, outside 0..{n_layers - 1}")
            layers[i] = known(name, f"pattern.at[{i}]")
        return layers
    default, use = known(pattern.default, "pattern.default"), known(pattern.use, "pattern.use")
    return [use if i % pattern.every == pattern.offset else default for i in range(n_layers)]


def _parse_pattern_string(text: str, mixers: dict, known) -> list[str]:
    """Grammar: seq := item*; item := (NAME | '(' seq ')') ['*' COUNT]. A NAME that is not a mixer but
    spells single-letter mixer names ("mmma") means one layer per letter."""
    tokens = re.findall(r"[A-Za-z_][A-Za-z0-9_]*|\d+|\S", text)
    pos = 0

    def parse_seq(depth: int) -> list[str]:
        nonlocal pos
        out: list[str] = []
        while pos < len(tokens) and tokens[pos] != ")":
            tok = tokens[pos]
            pos += 1
            if tok == "(":
                item = parse_seq(depth + 1)
                if pos >= len(tokens) or tokens[pos] != ")":
                    raise ValueError(f"pattern {text!r}: '(' without a matching ')'")
                pos += 1
            elif _NAME.fullmatch(tok):
                if tok in mixers or len(tok) == 1:
                    item = [known(tok, f"pattern {text!r}")]
                elif all(ch in mixers for ch in tok):
                    item = list(tok)  # one letter per layer
                else:
                    bad = next(ch for ch in tok if ch not in mixers)
                    raise ValueError(
                        f"pattern {text!r}: {tok!r} is neither a mixer ({sorted(mixers)}) nor one-letter mixer "
                        f"names (letter {bad!r} is not defined)"
                    )
            else:
                raise ValueError(f"pattern {text!r}: unexpected {tok!r}")
            if pos < len(tokens) and tokens[pos] == "*":
                if pos + 1 >= len(tokens) or not tokens[pos + 1].isdigit() or int(tokens[pos + 1]) == 0:
                    raise ValueError(f"pattern {text!r}: '*' must be followed by a positive count")
                count = int(tokens[pos + 1])
                if len(item) * count > MAX_LAYERS:
                    raise ValueError(f"pattern {text!r}: repeats to more than MAX_LAYERS={MAX_LAYERS} layers")
                item = item * count
                pos += 2
            out.extend(item)
            if len(out) > MAX_LAYERS:
                raise ValueError(f"pattern {text!r}: more than MAX_LAYERS={MAX_LAYERS} layers")
        if depth == 0 and pos < len(tokens):
            raise ValueError(f"pattern {text!r}: ')' without a matching '('")
        return out

    layers = parse_seq(0)
    if not layers:
        raise ValueError("pattern is empty")
    return layers
