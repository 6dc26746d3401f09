"""lm-evaluation-harness backends: `xlaserve` (an engine in this process) and `xlaserve-grpc` (a
running `xlaserve serve`). Importing this module, or `xlaserve.evals`, registers both, beside
lm-eval's own models.

    import lm_eval, xlaserve.evals
    lm_eval.simple_evaluate(model="xlaserve", model_args="model=smollm2,max_slots=8", tasks=["..."])

    xlaserve eval --model xlaserve --model_args model=smollm2,mesh=dp=2 --tasks hellaswag
    xlaserve eval --model xlaserve-grpc --model_args server=127.0.0.1:50051 --tasks hellaswag

(lm_eval's own command line only knows its built-in models; `xlaserve eval` is that command line
with these two registered.) Requests are tokenized exactly as lm-eval's HF backend tokenizes them
(TemplateLM: trailing context spaces move to the continuation, context+continuation are encoded
whole and split) and all of a task's requests go to the engine at once, so the slot manager
batches them, the choices of a question that differ only in their last token are read from one
row's logits (runtime/scoring.py share_rows), and shared contexts hit the prefix cache. Rolling
log-likelihoods use lm-eval's own window helpers.
"""

from __future__ import annotations

# lm-eval registers its built-in models (hf, vllm, ...) only when it is asked for a model while its
# registry is empty: registering ours first would hide them. So load its own models first.
import lm_eval.models  # noqa: F401
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window


def join_ranks(coordinator: str | None, num_processes: int | None, process_id: int | None) -> tuple[int, int]:
    """(rank, world size) of a data-parallel eval over several processes (hosts), each with its own
    engine or server: lm-eval gives each rank its share of every task's requests and gathers the
    metrics on rank 0 through the hooks below. They run over torch.distributed (gloo, TCP) -- lm-eval
    already depends on torch; JAX is not involved, so each process's engine stays on its own devices.
    Taken from model_args, else from torchrun's RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT."""
    import os

    env = os.environ
    if num_processes is None and int(env.get("WORLD_SIZE", "1")) > 1:
        num_processes, process_id = int(env["WORLD_SIZE"]), int(env["RANK"])
        coordinator = (
            coordinator or f"{env.get('MASTER_ADDR', '127.0.0.1')}:{env.get('MASTER_PORT', '29500')}"
        )
    if num_processes is None or int(num_processes) == 1:
        return 0, 1
    num_processes, process_id = int(num_processes), int(process_id if process_id is not None else -1)
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} must be in [0, {num_processes}) (num_processes)")
    if not coordinator or ":" not in str(coordinator):
        raise ValueError(f"coordinator={coordinator!r} must be HOST:PORT (process 0's address)")
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://{coordinator}",
            rank=process_id,
            world_size=num_processes,
            timeout=datetime.timedelta(hours=2),  # ranks wait for the slowest one's requests
        )
    return process_id, num_processes


class _XlaserveLM(TemplateLM):
    """Shared logic; subclasses provide _score(items), _generate(prompts, params), encode/decode.
    Data-parallel over processes when given (coordinator, num_processes, process_id)."""

    def __init__(self, eos_id: int, bos_id: int | None, max_length: int, ranks: tuple[int, int] = (0, 1)):
        super().__init__()
        self._eos, self._bos, self._max_length = eos_id, bos_id, max_length
        self._rank, self._world_size = ranks
        self._device = "cpu"  # where lm-eval puts the request counts it all-gathers
        self.requests_done = 0  # requests this process answered (its share)

    # lm-eval's hooks for data-parallel evaluation (used only when world_size > 1)
    def all_gather(self, tensor):
        import torch
        import torch.distributed as dist

        parts = [torch.zeros_like(tensor) for _ in range(self._world_size)]
        dist.all_gather(parts, tensor)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj, dst=0):
        import torch.distributed as dist

        out = [None] * self._world_size if self._rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    @property
    def eot_token_id(self) -> int:
        return self._eos

    @property
    def prefix_token_id(self) -> int:
        return self._bos if self._bos is not None else self._eos  # as lm-eval's HF backend

    @property
    def max_length(self) -> int:
        return self._max_length

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """(sum of log-probs, all greedy) of each continuation; like the HF backend, the sequence
        is cut on the left to max_length + 1 tokens."""
        items = []
        for _, context, continuation in requests:
            seq = (context + continuation)[-(self.max_length + 1) :]
            items.append((seq, len(seq) - len(continuation)))
        self.requests_done += len(items)
        return [(sum(lps), all(greedy)) for lps, greedy in self._score(items)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        plans = []
        for (text,) in [r.args for r in requests]:
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            plans.append([(ctx + cont, len(ctx)) for ctx, cont in windows])
        self.requests_done += len(plans)
        flat = self._score([w for windows in plans for w in windows])
        out, i = [], 0
        for windows in plans:
            out.append(sum(sum(lps) for lps, _ in flat[i : i + len(windows)]))
            i += len(windows)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False):
        prompts, params = [], []
        for context, gen_kwargs in [r.args for r in requests]:
            kw = dict(gen_kwargs)
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.pop("max_gen_toks", 256))
            sample = bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 0.0)) if sample else 0.0
            ids = self.tok_encode(context)[-(self.max_length - max_new) :]
            prompts.append(ids)
            params.append(
                dict(max_tokens=max_new, temperature=temperature, stop=tuple(u for u in until if u))
            )
        self.requests_done += len(prompts)
        return self._generate(prompts, params)


@register_model("xlaserve")
class XlaserveLM(_XlaserveLM):
    """The engine in this process. model_args: model (alias, .gguf, HF dir or xlaserve checkpoint),
    mesh ("dp=2,tp=2": replicas on this host's devices), max_length (scored context, default
    max_model_len - 2), any EngineConfig field, and for a run over several hosts coordinator
    (HOST:PORT), num_processes, process_id. An `llm=` (an xlaserve.LLM) may be passed directly."""

    def __init__(
        self,
        model: str = "smollm2",
        llm=None,
        mesh: str | None = None,
        max_length: int | None = None,
        coordinator: str | None = None,
        num_processes: int | None = None,
        process_id: int | None = None,
        batch_size=None,
        max_batch_size=None,
        device=None,
        **engine_fields,
    ):
        from xlaserve import LLM

        del batch_size, max_batch_size, device  # lm-eval passes these; the slot manager batches by itself
        ranks = join_ranks(coordinator, num_processes, process_id)
        # an eval run compiles the programs it runs (compiled.py), unless model_args say otherwise
        engine_fields = {"compile_at": "use"} | engine_fields
        self.llm = llm if llm is not None else LLM(model, mesh=mesh, **engine_fields)
        cfg = self.llm.config
        limit = self.llm.engine_config.max_model_len - 2
        if max_length is not None and not 1 <= int(max_length) <= limit:
            raise ValueError(f"max_length={max_length} must be in [1, {limit}] (max_model_len - 2)")
        super().__init__(cfg.eos_token_ids[0], cfg.bos_token_id, int(max_length or limit), ranks)

    @property
    def tokenizer_name(self) -> str:
        return self.llm.model_path

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.llm.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.llm.tokenizer.decode(tokens)

    def _score(self, items):
        return [(r.logprobs, r.is_greedy) for r in self.llm.score(items)]

    def _generate(self, prompts, params):
        from xlaserve import SamplingParams

        outs = self.llm.generate(prompts, [SamplingParams(**p) for p in params])
        return [o.text for o in outs]


@register_model("xlaserve-grpc")
class XlaserveGrpcLM(_XlaserveLM):
    """A running server. model_args: server (HOST:PORT), api_key, max_length, chunk (items per
    Score call); coordinator, num_processes, process_id to split a task over several eval processes
    (each with its own server)."""

    def __init__(
        self,
        server: str = "127.0.0.1:50051",
        api_key: str | None = None,
        max_length: int | None = None,
        chunk: int = 256,
        coordinator: str | None = None,
        num_processes: int | None = None,
        process_id: int | None = None,
        batch_size=None,
        max_batch_size=None,
        device=None,
        **unused,
    ):
        from xlaserve.serve.client import Client

        ranks = join_ranks(coordinator, num_processes, process_id)
        self.client, self.chunk = Client(server, api_key=api_key), int(chunk)
        info = self.client.model_info()
        bos = info.bos_token_id if info.HasField("bos_token_id") else None
        super().__init__(info.eos_token_ids[0], bos, int(max_length or info.context_length - 2), ranks)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.client.tokenize(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.client.detokenize(tokens)

    def _score(self, items):
        out = []
        for i in range(0, len(items), self.chunk):
            out += [
                (list(r.logprobs), list(r.is_greedy)) for r in self.client.score(items[i : i + self.chunk])
            ]
        return out

    def _generate(self, prompts, params):
        from concurrent.futures import ThreadPoolExecutor

        def one(args):
            ids, p = args
            return self.client.generate(tokens=ids, **p).text

        with ThreadPoolExecutor(max_workers=16) as pool:  # concurrent streams: the server batches them
            return list(pool.map(one, zip(prompts, params, strict=True)))


def main(argv=None) -> None:
    """lm_eval's command line with the xlaserve backends registered (`xlaserve eval`)."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = ["lm_eval", *argv]
    cli_evaluate()
