"""Model configuration (what the checkpoint is) and engine configuration (how we serve it).

The two are kept apart on purpose: a `ModelConfig` is fixed by the weights, an `EngineConfig` is
serving policy (slots, pages, buckets, dtypes) and may change between runs of the same model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from xlaserve.runtime import impls
from xlaserve.runtime.rope_config import RopeConfig
from xlaserve.runtime.spec_policy import resolve_schedule


@dataclass(frozen=True)
class Kernels:
    """Which implementation the model's matmuls and attention use (static: part of a program)."""

    attention: str = "xla"  # "xla" or "pallas"
    # "xla" or "pallas": quantized weights, and the MoE experts' grouped matmul (dense or quantized);
    # other dense weights always use XLA
    matmul: str = "xla"
    interpret: bool = False  # run Pallas kernels in interpret mode (CPU)
    mesh: object = None  # the ("tp",) jax Mesh the model is sharded over, when more than one device
    # (weight name, (output axis, input axis)) for every sharded matrix: its mesh axes
    matrix_specs: tuple[tuple[str, tuple], ...] = ()
    # which Pallas kernels: "gpu" (Triton), "tpu" (Mosaic), or None for the devices' platform
    # (the mesh's, else jax's default backend; CPU interprets the "gpu" kernels)
    platform: str | None = None
    backend: str | None = None  # the programs' backend (`target`); `lower` may name another one

    def spec(self, name: str) -> tuple:
        """(output, input) mesh axes of matrix `name` ("layers.wq"); (None, None) when replicated."""
        return dict(self.matrix_specs).get(name, (None, None))

    @property
    def target(self) -> str:
        """The backend the programs are compiled for ("cpu", "gpu", "tpu"): `backend`, else the
        mesh's devices', else jax's default backend."""
        import jax

        if self.backend is not None:
            return self.backend
        return self.mesh.devices.flat[0].platform if self.mesh is not None else jax.default_backend()

    @property
    def pallas_platform(self) -> str:
        """The family of Pallas kernels the "pallas" implementations run: "tpu" or "gpu"."""
        return self.platform or ("tpu" if self.target == "tpu" else "gpu")


XLA_KERNELS = Kernels()
MAX_SPECULATIVE = 16  # the most guesses one verify step checks per slot
CHOICES = {  # EngineConfig fields that take one of a few names
    "dtype": ("float32", "bfloat16", "float16"),
    "kv_cache_dtype": ("auto", "int8", "fp8"),
    "compile_at": ("start", "use"),
}


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer, fixed by its checkpoint. `architecture` names the family that
    runs it (`runtime/models/`). Shapes use: D=hidden, F=ffn, Hq/Hkv heads, Dh=head_dim, V=vocab.

    The fields after `name` are optional features (`FEATURES`): a family implements some of them,
    and a config that sets one its family does not implement is refused (`Family.check`)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope: RopeConfig = dataclasses.field(default_factory=RopeConfig)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = "llama"
    architecture: str = "llama"
    # optional features (FEATURES):
    hidden_act: str = "silu"  # the gated feed-forward's activation (HF's name for it)
    sliding_window: int | None = None  # attend to the last `sliding_window` positions only
    attention_bias: bool = False  # q/k/v (and o) projections have biases
    mlp_bias: bool = False  # feed-forward projections have biases
    # per layer "sliding_attention" or "full_attention" (HF's names); None: every layer alike
    # (windowed when sliding_window is set)
    layer_types: tuple[str, ...] | None = None
    rope_local: RopeConfig | None = None  # the RoPE of sliding layers, when it differs (Gemma 3)
    attn_logit_softcapping: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcapping: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5 (else head_dim's)
    # mixture of experts (runtime/models/moe.py): every layer's feed-forward is E experts of which
    # each token takes the top k by router probability; 0 experts: a dense feed-forward
    num_experts: int = 0  # E
    num_experts_per_tok: int = 0  # k, 1 ≤ k ≤ E
    moe_intermediate_size: int | None = None  # an expert's ffn size (None: intermediate_size)
    shared_expert_intermediate_size: int = 0  # a sigmoid-gated shared expert of this size (Qwen2-MoE)
    norm_topk_prob: bool = False  # the top-k probabilities are renormalised to sum to 1

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window} must be ≥ 1 (or None)")
        if self.layer_types is not None:
            bad = set(self.layer_types) - set(LAYER_TYPES)
            if bad or len(self.layer_types) != self.num_layers:
                raise ValueError(
                    f"layer_types={self.layer_types!r} must give one of {LAYER_TYPES} for each of the "
                    f"{self.num_layers} layers"
                )
        if self.num_experts < 0:
            raise ValueError(f"num_experts={self.num_experts} must be ≥ 0 (0: no experts)")
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, {self.num_experts}] "
                f"(num_experts)"
            )
        if not self.num_experts and (self.num_experts_per_tok or self.shared_expert_intermediate_size):
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} / shared_expert_intermediate_size="
                f"{self.shared_expert_intermediate_size} need num_experts ≥ 1"
            )

    def windows(self) -> tuple[int | None, ...]:
        """Per layer: the attention window (the last `w` positions), None for a global layer."""
        types = self.layer_types or (LAYER_TYPES[0],) * self.num_layers
        return tuple(self.sliding_window if t == LAYER_TYPES[0] else None for t in types)

    def ropes(self) -> tuple[RopeConfig, ...]:
        """Per layer: its RoPE (sliding layers take `rope_local` where there is one)."""
        local = self.rope_local or self.rope
        return tuple(local if w is not None else self.rope for w in self.windows())

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def expert_size(self) -> int:
        """An expert's ffn size (F of the [E, F, D] expert matrices)."""
        return self.moe_intermediate_size or self.intermediate_size

    def param_count(self, active: bool = False) -> int:
        """Parameters in total (`active`: those one token reads, its k experts only)."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
        ffn = 3 * d * f
        if self.num_experts:
            used = self.num_experts_per_tok if active else self.num_experts
            s = self.shared_expert_intermediate_size
            ffn = used * 3 * d * self.expert_size + self.num_experts * d + 3 * d * s + (d if s else 0)
        per_layer = attn + ffn + 2 * d
        heads = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + heads + d


# Optional ModelConfig features and their "off" values.
FEATURES = {
    "hidden_act": "silu",
    "sliding_window": None,
    "attention_bias": False,
    "mlp_bias": False,
    "layer_types": None,
    "rope_local": None,
    "attn_logit_softcapping": None,
    "final_logit_softcapping": None,
    "query_pre_attn_scalar": None,
    "num_experts": 0,
    "num_experts_per_tok": 0,
    "moe_intermediate_size": None,
    "shared_expert_intermediate_size": 0,
    "norm_topk_prob": False,
}
# the mixture-of-experts fields: every MoE family implements all of them
MOE_FEATURES = frozenset(list(FEATURES)[list(FEATURES).index("num_experts") :])
LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclass(frozen=True)
class EngineConfig:
    """Serving policy. None means "choose for the backend" (see `resolve`).

    - max_slots: decode batch size (concurrent sequences). None: sized by the memory plan (as many
      sequences of max_model_len as fit, at most runtime/memory.py's DEFAULT_SLOTS); `resolve`
      alone, which knows no memory, takes 8 (or the largest slot bucket).
    - page_size: tokens per KV page. num_pages: pool size (None: every slot can reach max_model_len).
    - max_model_len: longest sequence (prompt + output) served; ≤ the model's context.
    - prefill_buckets: padded prompt-chunk lengths; the largest is the chunk size for long prompts,
      the smallest (a page) takes what a prefix-cache hit leaves; 64 spares short prompts padding.
    - attn_block: tokens of KV visited per step of prefill's blocked attention loop (a multiple of
      page_size); chunks shorter than it use a smaller block (`attn_block_for`).
    - kv_buckets: KV lengths (tokens) the decode program is compiled for; a dispatch uses the
      smallest that holds every active sequence. None: 64, 256, 1024, ... and the longest.
    - slot_buckets: decode batch sizes compiled; a dispatch uses the smallest holding the highest
      busy slot (on CPU an idle row costs nearly as much as a busy one). None: 1 and max_slots.
    - decode_steps: decode steps run per dispatch (k); the host sees tokens every k steps.
    - max_logprobs: the most top-N alternatives a request may ask for.
    - speculative_k: the guess counts K the speculative verify program is compiled for (one per
      slot and KV bucket each); a step with fewer guesses pads to the next. Empty: no speculation.
    - speculative_schedule: K by batch size: entries (most running sequences, K ≤ max speculative_k,
      break-even) increasing in batch size; a step with more sequences than the last guesses
      nothing; a request whose steps emit fewer than break-even tokens on average (the cost of a
      verify step in decode steps; a pair's is spec_policy.VERIFY_COST) stops guessing for a while
      (runtime/spec_policy.py). None: spec_policy.SCHEDULE, K capped at max speculative_k.
    - prefill_token_budget: prompt tokens prefilled per step across all prompts, bounding how long
      running streams wait for a new prompt (and a cancel for a long prompt to stop). None: measured
      at start-up so that a step's prefill takes at most max_prefill_stall_s (runtime/budget.py).
    - max_prefill_stall_s: the longest a step's prefill should stall running streams, in seconds
      (what the measured prefill_token_budget aims for).
    - mixed_batch: a step that prefills prompts takes the running sequences' next tokens in the same
      call, as one-token chunks, instead of a decode call after it (runtime/scheduler.py): the
      device runs one call where it ran two. Needs the packed prefill layout (CPU with the native
      attention), decode_steps 1 and no speculative_k. A token's logits then depend on whether its
      step prefilled (summation order), so greedy output may vary with arrival times.
    - prefix_cache: reuse the K/V pages of prompt prefixes seen before.
    - scoring: also compile the scoring programs (log-probs of given tokens, for evals).
    - admission: max_queue waiting requests; max_per_client requests in flight per client id (None:
      no limit); max_prompt_tokens / max_new_tokens (None: max_model_len - 1).
    - dtype: activations/KV/weights ("float32", "bfloat16"); None: float32 on CPU, bfloat16 elsewhere.
    - kv_cache_dtype: how K/V are stored: "auto" (in dtype), "int8" (every backend) or "fp8" (float8
      e4m3; GPU/TPU), each quantized with a float32 scale per token and kv head (runtime/attention.py).
      A quantized cache takes about half the bytes of a bfloat16 one, so twice the slots fit.
    - quantized: keep GGUF-quantized weights quantized in memory (dequantized inside the programs;
      on CPU in runtime/quant.py's CPU layouts, ~2x faster decode than float32 weights) rather than
      dequantized at load. None: quantized.
    - compile_cache: JAX persistent compilation cache directory; "" turns it off; None: default.
    - compile_at: "start" compiles every program in the constructor (no request waits for a
      compile); "use" compiles each the first time it runs, so start-up takes only the programs a
      run needs (runtime/compiled.py).
    - attention_impl, matmul_impl: "pallas" (our kernels), "xla", "native" (our C++ kernels on CPU:
      attention over a float32 cache, decode's quantized matmuls) or "auto". What auto picks and what is
      refused: runtime/impls.py. On CPU the Pallas kernels run in interpret mode (correct, slow: for
      tests). The kernels are Triton's on GPU and Mosaic's on TPU (`Kernels.pallas_platform`); a
      shape or dtype a TPU kernel does not take runs on the XLA path (pallas_kernels/tpu_*.py
      `unsupported`).
    - memory_fraction: the share of each device's memory the engine plans to use for weights, KV
      pages and activations (runtime/memory.py); None: 0.9. A max_slots or num_pages given that does
      not fit in it is refused.
    - device_memory: bytes of memory per device to plan for; None: asked of the device (the
      allocator's limit on GPU/TPU, the host's RAM on CPU). For planning another machine's run.
    """

    max_slots: int | None = None
    page_size: int = 16
    num_pages: int | None = None
    max_model_len: int | None = None
    prefill_buckets: tuple[int, ...] = (16, 32, 64, 128, 512)
    attn_block: int = 256
    kv_buckets: tuple[int, ...] | None = None
    slot_buckets: tuple[int, ...] | None = None
    decode_steps: int = 1
    max_logprobs: int = 20
    speculative_k: tuple[int, ...] = ()
    speculative_schedule: tuple[tuple, ...] | None = None
    prefill_token_budget: int | None = None
    max_prefill_stall_s: float = 0.25
    mixed_batch: bool = False
    prefix_cache: bool = True
    scoring: bool = True
    max_queue: int = 4096
    max_per_client: int | None = None
    max_prompt_tokens: int | None = None
    max_new_tokens: int | None = None
    dtype: str | None = None
    kv_cache_dtype: str = "auto"
    quantized: bool | None = None
    compile_cache: str | None = None
    compile_at: str = "start"
    attention_impl: str = "auto"
    matmul_impl: str = "auto"
    memory_fraction: float | None = None
    device_memory: int | None = None

    def prefill_bucket(self, n: int) -> int:
        """The smallest prefill bucket holding n tokens (the largest bucket if none does)."""
        return next((t for t in self.prefill_buckets if t >= n), self.prefill_buckets[-1])

    def attn_block_for(self, t: int) -> int:
        """The KV block a prefill/score program over chunks of bucket t visits per loop step: no
        more than the chunk (rounded up to pages) nor attn_block, and dividing attn_block. A short
        chunk then gathers and scores only the keys it can see instead of a whole attn_block of
        mostly masked ones (1.3x faster scoring of short sequences on CPU); a long cached prefix
        takes more, cheaper, steps."""
        want = min(self.attn_block, -(-t // self.page_size) * self.page_size)
        return max(b for b in range(self.page_size, want + 1, self.page_size) if self.attn_block % b == 0)

    def resolve(self, model: ModelConfig, backend: str) -> EngineConfig:
        """Fill in backend defaults and check every field against its limit."""
        on_cpu = backend == "cpu"
        max_len = self.max_model_len or min(model.max_position_embeddings, 4096)
        cfg = dataclasses.replace(
            self,
            dtype=self.dtype or ("float32" if on_cpu else "bfloat16"),
            quantized=True if self.quantized is None else self.quantized,
            max_model_len=max_len,
            prefill_buckets=tuple(sorted(set(self.prefill_buckets))),
            max_slots=max((8, *(self.slot_buckets or ()))) if self.max_slots is None else self.max_slots,
        )
        _check(cfg.max_slots >= 1, "max_slots", cfg.max_slots, "must be ≥ 1")
        _check(cfg.page_size >= 1, "page_size", cfg.page_size, "must be ≥ 1")
        _check(
            1 <= max_len <= model.max_position_embeddings,
            "max_model_len",
            max_len,
            f"must be in [1, {model.max_position_embeddings}] (the model's context)",
        )
        _check(
            cfg.attn_block >= cfg.page_size and cfg.attn_block % cfg.page_size == 0,
            "attn_block",
            cfg.attn_block,
            f"must be a positive multiple of page_size ({cfg.page_size})",
        )
        _check(
            bool(cfg.prefill_buckets) and cfg.prefill_buckets[0] >= 1,
            "prefill_buckets",
            cfg.prefill_buckets,
            "must be non-empty positive lengths",
        )
        longest = cfg.pages_per_seq * cfg.page_size
        buckets = cfg.kv_buckets or tuple(b for b in (64 * 4**i for i in range(12)) if b < longest)
        _check(
            all(0 < b <= longest for b in buckets),
            "kv_buckets",
            cfg.kv_buckets,
            f"must be lengths in [1, {longest}]",
        )
        rounded = {-(-b // cfg.page_size) * cfg.page_size for b in buckets} | {longest}
        cfg = dataclasses.replace(cfg, kv_buckets=tuple(sorted(rounded)))
        slots = cfg.slot_buckets or (1,)
        _check(
            all(1 <= b <= cfg.max_slots for b in slots),
            "slot_buckets",
            cfg.slot_buckets,
            f"must be batch sizes in [1, {cfg.max_slots}] (max_slots)",
        )
        cfg = dataclasses.replace(cfg, slot_buckets=tuple(sorted(set(slots) | {cfg.max_slots})))
        _check(cfg.decode_steps >= 1, "decode_steps", cfg.decode_steps, "must be ≥ 1")
        spec_k = tuple(sorted(set(cfg.speculative_k)))
        _check(
            all(1 <= k <= MAX_SPECULATIVE for k in spec_k),
            "speculative_k",
            cfg.speculative_k,
            f"must be guess counts in [1, {MAX_SPECULATIVE}]",
        )
        cfg = dataclasses.replace(cfg, speculative_k=spec_k)
        schedule = resolve_schedule(cfg.speculative_schedule, spec_k[-1] if spec_k else 0)
        cfg = dataclasses.replace(cfg, speculative_schedule=schedule)
        _check(
            not cfg.mixed_batch or (cfg.decode_steps == 1 and not spec_k),
            "mixed_batch",
            cfg.mixed_batch,
            "needs decode_steps 1 and no speculative_k (a mixed step decodes one token, unguessed)",
        )
        attention, matmul = impls.resolve(cfg.attention_impl, cfg.matmul_impl, on_cpu)
        cfg = dataclasses.replace(cfg, attention_impl=attention, matmul_impl=matmul)
        _check(cfg.max_queue >= 1, "max_queue", cfg.max_queue, "must be ≥ 1")
        fraction = cfg.memory_fraction
        _check(
            fraction is None or (isinstance(fraction, int | float) and 0 < fraction <= 1),
            "memory_fraction",
            fraction,
            "must be in (0, 1] (or None: 0.9)",
        )
        _check(
            cfg.device_memory is None or cfg.device_memory >= 1,
            "device_memory",
            cfg.device_memory,
            "must be a positive number of bytes (or None: ask the device)",
        )
        for name in ("max_per_client", "max_prompt_tokens", "max_new_tokens", "prefill_token_budget"):
            value = getattr(cfg, name)
            _check(value is None or value >= 1, name, value, "must be ≥ 1 (or None)")
        _check(0 <= cfg.max_logprobs <= 100, "max_logprobs", cfg.max_logprobs, "must be in [0, 100]")
        stall = cfg.max_prefill_stall_s
        _check(
            isinstance(stall, int | float) and 0 < stall < math.inf,
            "max_prefill_stall_s",
            stall,
            "must be a positive number of seconds",
        )
        for name, choices in CHOICES.items():
            value = getattr(cfg, name)
            _check(value in choices, name, value, f"must be {', '.join(choices[:-1])} or {choices[-1]}")
        _check(
            not (on_cpu and cfg.kv_cache_dtype == "fp8"),
            "kv_cache_dtype",
            cfg.kv_cache_dtype,
            "needs a GPU or TPU (float8 e4m3); on cpu use auto or int8",
        )
        min_pages = cfg.pages_per_seq
        _check(
            cfg.num_pages is None or cfg.num_pages >= min_pages,
            "num_pages",
            cfg.num_pages,
            f"must be ≥ {min_pages} (one sequence of max_model_len)",
        )
        return cfg

    @property
    def pages_per_seq(self) -> int:
        """Width of a page-table row: enough pages for max_model_len, rounded up to whole attn blocks."""
        assert self.max_model_len is not None, "resolve() first"
        tokens = -(-self.max_model_len // self.attn_block) * self.attn_block
        return tokens // self.page_size

    @property
    def total_pages(self) -> int:
        return self.num_pages if self.num_pages is not None else self.max_slots * self.pages_per_seq


def _check(ok: bool, field: str, value, limit: str) -> None:
    if not ok:
        raise ValueError(f"{field}={value!r} {limit}")
