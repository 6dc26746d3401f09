"""`xlaserve.LLM`: load a model, compile it, and run prompts through the slot manager: generate,
stream and chat; score and score_rolling (results and windows in runtime/scoring.py); stats.

llm = LLM("smollm2")
out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=32))
for delta in llm.stream("Tell me a story", SamplingParams(max_tokens=64)):
    print(delta.text, end="")
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np

from xlaserve.checkpoints import registry
from xlaserve.checkpoints.load import load_model
from xlaserve.data import TWO_CITIES
from xlaserve.runtime import budget
from xlaserve.runtime.admission import check_sampling, prompt_bytes
from xlaserve.runtime.config import MAX_SPECULATIVE, EngineConfig
from xlaserve.runtime.draft import DraftEngine, check_pair
from xlaserve.runtime.engine import Engine
from xlaserve.runtime.grammar import Grammars
from xlaserve.runtime.layout import SCORE_TARGETS, Layout
from xlaserve.runtime.leader import LeaderEngine
from xlaserve.runtime.replicas import Replicas
from xlaserve.runtime.request import Delta, Request, RequestOutput, Timings
from xlaserve.runtime.runner import Runner
from xlaserve.runtime.sampling_params import SamplingParams, with_seed
from xlaserve.runtime.scoring import ScoreResult, read_row, rolling_windows, share_rows
from xlaserve.runtime.spec_policy import speculative_fields
from xlaserve.runtime.stats import EngineStats
from xlaserve.sharding.mesh import MeshSpec, device_groups, parse_mesh

log = logging.getLogger("xlaserve")

Prompt = str | Sequence[int]


def enable_compile_cache(path: str | None) -> str | None:
    """Turn on JAX's persistent compilation cache (None: the default location; "": off)."""
    if path == "":
        return None
    path = path or os.environ.get("XLASERVE_COMPILE_CACHE") or str(registry.home() / "jax-cache")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path


class LLM:
    def __init__(
        self,
        model: str = registry.DEFAULT_MODEL,
        *,
        engine_config: EngineConfig | None = None,
        mesh: str | MeshSpec | None = None,
        progress: Callable[[str], None] | None = None,
        speculative: dict | None = None,
        **engine_fields,
    ):
        """model: an alias ("smollm2", pulled on first use), a .gguf file, an HF directory or an
        xlaserve checkpoint directory (`xlaserve convert`).
        mesh: "tp=4", "dp=2,tp=4", ...: tp shards the model over devices; dp runs that many
        replicas, each on its own tp group (default: one device).
        speculative: speculative decoding, {"method": "ngram", "draft" or "eagle",
        "num_speculative_tokens": K (default 4), "model": the draft model (method "draft"; any
        `model` form, with the target's tokenizer), "head": a draft head's directory trained for
        this model (method "eagle"; `xlaserve train-draft`; needs flax)}: sets speculative_k=(K,)
        (speculative_k alone means n-gram lookup) and, for a draft unless given,
        speculative_schedule (spec_policy.py).
        engine_fields: any EngineConfig field (max_slots, page_size, max_model_len, dtype,
        quantized, decode_steps, prefill_buckets, ...), overriding `engine_config`."""
        progress = progress or (lambda msg: log.info(msg))
        base = engine_config or EngineConfig()
        unknown = set(engine_fields) - set(EngineConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown engine option(s): {', '.join(sorted(unknown))}")
        draft_model = speculative_fields(speculative, engine_fields, MAX_SPECULATIVE)
        base = EngineConfig(**{**base.__dict__, **engine_fields})
        enable_compile_cache(base.compile_cache)
        on_cpu = jax.default_backend() == "cpu"
        dtype = base.dtype or ("float32" if on_cpu else "bfloat16")
        quantized = True if base.quantized is None else base.quantized
        path = registry.resolve(model, log=progress)
        spec = parse_mesh(mesh)
        groups = [None] if spec.devices == 1 and mesh is None else device_groups(spec)
        progress(f"loading {path}")
        t0 = time.perf_counter()
        # an xlaserve checkpoint is restored straight onto the first group's devices
        loaded = load_model(path, dequantize=not quantized, dtype=dtype, mesh=groups[0])
        load_seconds = time.perf_counter() - t0
        weights = lambda i, g, m=loaded: m.weights if i == 0 or m.restore is None else m.restore(g)
        draft, footprint = None, (0, 0)  # a draft model's weights and pages go into the memory plan
        head = None  # a draft head (draft_head.Head) reads the target's features: the engine returns them
        if speculative is not None and speculative.get("method") == "eagle":
            if jax.process_count() > 1:
                raise ValueError("speculative decoding with a draft head runs on one host")
            from xlaserve.checkpoints.draft_head import load_head

            head = load_head(speculative["head"], loaded.config, loaded.weights, base.speculative_k[-1])
        if draft_model is not None:
            if jax.process_count() > 1:
                raise ValueError("speculative decoding with a draft model runs on one host")
            draft_path = registry.resolve(draft_model, log=progress)
            progress(f"loading the draft model {draft_path}")
            draft = load_model(draft_path, dequantize=not quantized, dtype=dtype, mesh=groups[0])
            pair = [(str(p), m.config, m.tokenizer) for p, m in ((path, loaded), (draft_path, draft))]
            check_pair(*pair)
            try:
                lay = Layout.build(
                    draft.config, draft.weights, base, backend=jax.default_backend(), mesh=groups[0]
                )
            except ValueError as e:
                raise ValueError(f"the draft model {draft_path}: {e}") from None
            footprint = lay.footprint()
        calibration = None
        if base.kv_cache_dtype != "auto":  # real text to measure the key smoothing on, after
            # the token sequences start with (its key is the attention sink every query reads)
            cfg = loaded.config
            start = cfg.bos_token_id if cfg.bos_token_id is not None else next(iter(cfg.eos_token_ids), None)
            text = loaded.tokenizer.encode(TWO_CITIES.read_text()[:4000], add_special_tokens=False)
            calibration = text if start is None else [start, *text]
        kw = dict(progress=progress, calibration=calibration)
        engines = [
            Engine(loaded.config, weights(i, g), base, mesh=g, draft=footprint, features=bool(head), **kw)
            for i, g in enumerate(groups)
        ]
        drafts = [
            DraftEngine(e, draft.config, weights(i, g, draft), **kw)
            for i, (e, g) in enumerate(zip(engines, groups, strict=True))
            if draft is not None
        ]
        if head is not None:  # each runner guesses with the head, over its engine's features
            drafts = [head] * len(engines)
        if jax.process_count() > 1:  # multi-host: process 0 leads, the others replay its calls
            if len(engines) > 1:
                raise ValueError("multi-host runs one tensor-parallel model (dp=1); give the mesh as tp=N")
            if jax.process_index() == 0:
                engines = [LeaderEngine(engines[0])]
        self._setup(
            engines, loaded.tokenizer, str(path), loaded.quantization, load_seconds, spec, progress, drafts
        )

    @classmethod
    def from_engine(
        cls, engine, tokenizer, *, source: str = "(in memory)", quantization: str = "none", draft=None
    ) -> LLM:
        """An LLM over an engine built elsewhere (e.g. `MockEngine` in tests); draft: a DraftEngine
        built for it, or a draft_head.Head (the engine built with `features`), to speculate with."""
        self = cls.__new__(cls)
        self._setup(
            [engine], tokenizer, source, quantization, 0.0, MeshSpec(), drafts=[draft] if draft else []
        )
        return self

    def _setup(
        self, engines, tokenizer, source, quantization, load_seconds, mesh, progress=None, drafts=()
    ) -> None:
        self.engines, self.engine, self.tokenizer = engines, engines[0], tokenizer
        self.config = engines[0].cfg
        self.model_path, self.quantization, self.load_seconds = source, quantization, load_seconds
        self.mesh = mesh
        # Measured on one replica (they run the same programs on the same kind of devices); a follower
        # process only replays the leader's calls, the leader's measurement included.
        follower = jax.process_count() > 1 and not isinstance(engines[0], LeaderEngine)
        self.prefill_budget = budget.prefill_budget(engines[0], measure_it=not follower)
        (progress or log.info)(self.prefill_budget.describe())
        self.grammars = Grammars(tokenizer, self.config.vocab_size, self.config.eos_token_ids)
        runners = [
            Runner(e, tokenizer, token_budget=self.prefill_budget, grammars=self.grammars, draft=d)
            for e, d in itertools.zip_longest(engines, drafts)
        ]
        self.draft = drafts[0] if drafts else None
        self.runner = runners[0] if len(runners) == 1 else Replicas(runners)
        self._ids = itertools.count()
        self._rng = np.random.default_rng()
        self.eos_ids = frozenset(self.config.eos_token_ids)

    @property
    def engine_config(self) -> EngineConfig:
        return self.engine.ecfg

    def describe_mesh(self) -> str:
        devices = sum(e.mesh.size if e.mesh is not None else 1 for e in self.engines)
        return f"{self.mesh} over {devices} {jax.default_backend()} device{'s' if devices > 1 else ''}"

    # -- requests ---------------------------------------------------------------------------------

    def encode(self, prompt: Prompt, *, chat: bool = False, allow_special_tokens: bool = False) -> list[int]:
        """Prompt text (or chat messages with chat=True) -> ids, checked against the engine's limits;
        a text too big to fit is refused before it is tokenized (RequestTooLarge). In chat messages,
        special-token text ("<|im_start|>") is plain text unless allow_special_tokens=True
        (Tokenizer.encode_chat); a text prompt is the caller's own and keeps its special tokens."""
        self.check_prompt_size(prompt, chat)
        if chat:
            ids = self.tokenizer.encode_chat(prompt, allow_special_tokens=allow_special_tokens)
        elif isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
            bad = next((t for t in ids if not 0 <= t < self.config.vocab_size), None)
            if bad is not None:
                raise ValueError(f"prompt token id {bad} is out of range [0, {self.config.vocab_size})")
        if not ids:
            raise ValueError("prompt is empty (0 tokens)")
        return ids

    def check_prompt_size(self, prompt, chat: bool = False) -> None:
        """Refuse (RequestTooLarge) a prompt text, or chat messages, whose size in bytes cannot fit
        max_prompt_tokens, without tokenizing it (admission.py); `encode` calls it first."""
        n, field = prompt_bytes(prompt, chat)
        token_bytes = getattr(self.tokenizer, "max_token_bytes", None)
        self.runner.scheduler.limits.check_prompt_bytes(n, token_bytes, field)

    def sampling_params(self, **fields) -> SamplingParams:
        """SamplingParams(**fields), checked first against this engine's limits, so a refusal quotes
        the limit that applies here (max_logprobs, the vocabulary size) rather than the bounds
        SamplingParams knows without an engine, and a json_schema / regex / grammar that does not
        compile is refused with llguidance's message. What a server should build requests' params
        with."""
        self._check_params(fields.get("logprobs"), fields.get("stop_token_ids") or ())
        params = SamplingParams(**fields)
        self.grammars.check(params)
        return params

    def _check_params(self, logprobs, stop_token_ids) -> None:
        most, vocab = self.engine_config.max_logprobs, self.config.vocab_size
        check_sampling(logprobs, stop_token_ids, max_logprobs=most, vocab_size=vocab)

    def make_request(
        self,
        prompt: Prompt,
        params: SamplingParams,
        *,
        chat: bool = False,
        request_id: str | None = None,
        priority: int = 0,
        client_id: str | None = None,
        timeout_s: float | None = None,
        allow_special_tokens: bool = False,
    ) -> Request:
        """A validated request (ValueError / RequestTooLarge name the field and the limit; a
        json_schema, regex or grammar that does not compile is refused here, naming the field).
        allow_special_tokens: see `encode` (chat messages only)."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        self._check_params(params.logprobs, params.stop_token_ids)
        grammar = self.grammars.compile(params)
        ids = self.encode(prompt, chat=chat, allow_special_tokens=allow_special_tokens)
        now = time.perf_counter()
        req = Request(
            request_id=request_id or f"req-{next(self._ids)}",
            prompt_ids=ids,
            params=params,
            seed=with_seed(params, self._rng),
            eos_ids=self.eos_ids,
            timings=Timings(arrival=now),
            priority=priority,
            client_id=client_id,
            deadline=None if timeout_s is None else now + timeout_s,
            grammar=grammar,
        )
        self.runner.scheduler.check(req)
        return req

    def stats(self) -> EngineStats:
        """Slots busy, pages free/used/cached, queue length, prefix hit rate, preemptions, ...
        (between calls, every step's MoE routing counts included)."""
        return self.runner.stats()

    def _run(self, requests: list[Request]) -> Iterator[Delta]:
        submitted = []
        try:
            for r in requests:
                self.runner.submit(r)
                submitted.append(r)
            pending = {r.request_id for r in requests}
            while pending:
                for delta in self.runner.step():
                    yield delta
                    if delta.finished:
                        pending.discard(delta.request.request_id)
        finally:  # an error or an abandoned stream: nothing stays queued or holds a slot
            for r in submitted:
                if not r.finished:
                    self.runner.cancel(r.request_id)
            while self.runner.busy and not self.runner.seqs:
                self.runner.step()  # read the last in-flight dispatch

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        chat: bool = False,
        on_delta: Callable[[int, Delta], None] | None = None,
        allow_special_tokens: bool = False,
    ) -> list[RequestOutput]:
        """Run every prompt to completion, batched; outputs in prompt order. With chat=True each
        prompt is a list of {"role", "content"} messages (the model's template is applied; special
        tokens in them are text unless allow_special_tokens). on_delta(i, delta) is called as
        prompt i produces tokens."""
        prompts = _as_list(prompts, chat)
        params = params or SamplingParams()
        plist = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"got {len(plist)} SamplingParams for {len(prompts)} prompts")
        requests = [
            self.make_request(p, sp, chat=chat, allow_special_tokens=allow_special_tokens)
            for p, sp in zip(prompts, plist, strict=True)
        ]
        for r in requests:  # nobody reads tokens as they come: no stall to bound (budget.py)
            r.streamed = on_delta is not None
        index = {r.request_id: i for i, r in enumerate(requests)}
        for delta in self._run(requests):
            if on_delta is not None:
                on_delta(index[delta.request.request_id], delta)
        return [r.output() for r in requests]

    def score_request(self, item, request_id: str | None = None) -> Request:
        """A scoring request for (context text, continuation text) or (token ids, start index)."""
        first, second = item
        if isinstance(first, str) and isinstance(second, str):
            self.check_prompt_size(first + second, chat=False)
            context = self.tokenizer.encode(first) if first else []
            if not context:  # the first scored token needs something before it
                context = [self._start_token]
            continuation = self.tokenizer.encode(second, add_special_tokens=False)
            if not continuation:
                raise ValueError("continuation is empty (0 tokens)")
            tokens, start = context + continuation, len(context)
        else:
            tokens, start = self.encode(list(first)), second
            if isinstance(start, bool) or not isinstance(start, int) or not 1 <= start < len(tokens):
                raise ValueError(
                    f"start={start!r} must be an integer in [1, {len(tokens) - 1}] (len(tokens) - 1)"
                )
        return self._scoring(tokens, start, request_id)

    def _scoring(self, tokens, start: int, request_id: str | None, alts=None) -> Request:
        req = Request(
            request_id=request_id or f"score-{next(self._ids)}",
            prompt_ids=tokens,
            params=SamplingParams(temperature=0.0, max_tokens=1),
            seed=0,
            eos_ids=self.eos_ids,
            timings=Timings(arrival=time.perf_counter()),
            score_start=start,
            score_alts=alts or {},
        )
        self.runner.scheduler.check(req)
        return req

    @property
    def _start_token(self) -> int:
        """What scoring conditions a text's first token on: BOS, else EOS."""
        bos = self.config.bos_token_id
        return bos if bos is not None else next(iter(self.eos_ids))

    def score(self, items, *, share: bool = True) -> list[ScoreResult]:
        """Log-probs of continuations: each item is (context, continuation) text, or (token ids,
        start) to score ids[start:]. Runs prefill-only through the slot manager, batched; shared
        contexts hit the prefix cache. share: items that differ only in their last token (the
        one-token choices of a question) are read from one row's logits (scoring.share_rows);
        False scores every item as a row of its own."""
        requests = [self.score_request(item) for item in items]
        if not share:
            for _ in self._run(requests):
                pass
            return [ScoreResult.of(r) for r in requests]
        rows, read = self.shared_rows(requests)
        for _ in self._run(rows):
            pass
        return read()

    def shared_rows(self, requests: list[Request]) -> tuple[list[Request], Callable[[], list[ScoreResult]]]:
        """The scoring requests that stand for `requests` (checked items of `score_request`), and
        what reads each item's result once they have all finished: items that differ only in their
        last token share one row (scoring.share_rows). The gRPC Score path runs these too."""
        pairs = [(r.prompt_ids, r.score_start) for r in requests]
        rows, where = share_rows(pairs, max_alts=SCORE_TARGETS - 1)
        row_reqs = [self._scoring(row.tokens, row.start, None, row.alts) for row in rows]
        return row_reqs, lambda: [read_row(*pairs[i], rows[r], row_reqs[r]) for i, r in enumerate(where)]

    def score_rolling(
        self, texts, window: int | None = None, prefix_token: int | None = None
    ) -> list[ScoreResult]:
        """Log-likelihood of every token of each text (perplexity), predicted `window` tokens at a
        time (default: the engine's max_model_len - 2): the first window is conditioned on
        `prefix_token` (default BOS, else EOS), each later one on the token before it, the last
        (shorter) one on a full window of context: lm-evaluation-harness's windows
        (`runtime/scoring.py` rolling_windows)."""
        limit = self.engine_config.max_model_len - 2
        window = window or limit
        if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= limit:
            raise ValueError(f"window={window!r} must be in [1, {limit}] (max_model_len - 2)")
        prefix = self._start_token if prefix_token is None else prefix_token
        plans = []
        for text in texts:
            ids = text if not isinstance(text, str) else self.tokenizer.encode(text, add_special_tokens=False)
            plans.append(rolling_windows(ids, window, prefix))
        flat = self.score([p for pieces in plans for p in pieces])
        out, i = [], 0
        for pieces in plans:
            out.append(ScoreResult.concat(flat[i : i + len(pieces)]))
            i += len(pieces)
        return out

    def chat(
        self, messages, params: SamplingParams | None = None, *, allow_special_tokens: bool = False
    ) -> RequestOutput:
        """One conversation (a list of messages) -> the assistant's reply."""
        return self.generate([messages], params, chat=True, allow_special_tokens=allow_special_tokens)[0]

    def stream(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        chat: bool = False,
        allow_special_tokens: bool = False,
    ) -> Iterator[Delta]:
        """Deltas of one request as they are produced; the last has delta.finished."""
        req = self.make_request(
            prompt, params or SamplingParams(), chat=chat, allow_special_tokens=allow_special_tokens
        )
        yield from self._run([req])


def _as_list(prompts, chat: bool) -> list:
    if chat:
        # one conversation (a list of dicts) or several
        if isinstance(prompts, list | tuple) and prompts and isinstance(prompts[0], dict):
            return [prompts]
        return list(prompts)
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, Sequence) and prompts and all(isinstance(t, int | np.integer) for t in prompts):
        return [prompts]  # a single prompt given as token ids
    if not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a string, a list of token ids, or a non-empty list of those")
    return list(prompts)
