"""The engine step loop every role shares, and LLM, the offline API with vLLM's names.

One step: the scheduler picks prefills and decodes, their chunks become one flat Batch, the
model turns it into logits for each sequence's last token, the sampler picks tokens, and each
request is checked for EOS, stop tokens, stop strings and length. Finished requests free their
blocks in the same step.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence

from tqdm import tqdm

from hma.attention import warm_up_prefill
from hma.batch import Batch, SeqChunk
from hma.config import EngineConfig, ModelConfig
from hma.cuda_graphs import DecodeGraphs
from hma.detokenizer import IncrementalDetokenizer
from hma.errors import InvalidRequestError, RequestTooLargeError
from hma.kv_cache import KVCache
from hma.loading import apply_chat_template, load_model, make_kv_cache, resolve_device, resolve_dtype
from hma.overlap import EagerSteps, InFlight
from hma.qwen3 import Qwen3ForCausalLM
from hma.request import PENDING, Request, RequestOutput
from hma.sampling import SamplingParams, make_generator, sample
from hma.scheduler import Scheduler, SchedulerOutput

log = logging.getLogger(__name__)

Prompt = str | list[int] | dict


class LLMEngine:
    """A model, its paged KV cache and a scheduler, driven one step at a time."""

    def __init__(self, model: Qwen3ForCausalLM, kv_cache: KVCache, config: EngineConfig,
                 tokenizer=None, eos_token_ids: Sequence[int] = (), runs_decode: bool = True) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.config = config
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self.device = next(model.parameters()).device
        self.scheduler = Scheduler(kv_cache.allocator, kv_cache.block_size, config.max_num_seqs,
                                   config.max_num_batched_tokens)
        on_cuda = self.device.type == "cuda" and not config.enforce_eager
        if on_cuda:
            model.use_piecewise_graphs(min(config.piecewise_graph_tokens, config.max_num_batched_tokens))
        use_graphs = on_cuda and runs_decode  # a prefill host never runs a decode step
        # The graphs keep one block for their padding rows: no request may count on it.
        self.max_model_len = _max_model_len(config, model.config, kv_cache, reserved_blocks=int(use_graphs))
        self._ids = itertools.count()
        self.graphs = DecodeGraphs(model, kv_cache, config.max_num_seqs, self.max_model_len) if use_graphs else None
        self.overlap = _overlap(config, self.graphs, model, kv_cache)  # launches overlapped steps, or None
        self._inflight: InFlight | None = None

    @classmethod
    def from_config(cls, config: EngineConfig, runs_decode: bool = True) -> LLMEngine:
        """Loads checkpoint, tokenizer and weights, then sizes the KV cache from what memory is left."""
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        model, tokenizer, eos_ids = load_model(config, device, dtype)
        kv_cache = make_kv_cache(model.config, config, dtype, device)
        return cls(model, kv_cache, config, tokenizer, eos_ids, runs_decode)

    def add_request(self, prompt: Prompt, params: SamplingParams,
                    request_id: str | None = None) -> Request:
        """Queues a prompt (text, token ids, or {"prompt_token_ids": [...]}); refuses what cannot fit."""
        token_ids, text = self._tokenize(prompt)
        if not token_ids:
            raise InvalidRequestError("the prompt is empty")
        if min(token_ids) < 0 or max(token_ids) >= self.model.config.vocab_size:
            raise InvalidRequestError(f"prompt token ids must lie in [0, {self.model.config.vocab_size})")
        total = len(token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise RequestTooLargeError(
                f"this request needs {len(token_ids)} prompt + {params.max_tokens} max_tokens = {total} "
                f"tokens, over max_model_len={self.max_model_len} ({self.kv_cache.num_tokens} tokens fit "
                f"in the KV cache)")
        req = Request(request_id or str(next(self._ids)), token_ids, params, prompt=text,
                      generator=make_generator(params.seed, self.device))
        self.scheduler.add(req)
        return req

    def add_prefilled(self, req: Request, first_token: int) -> None:
        """Joins a request whose prompt KV is already in its blocks (prefilled elsewhere) to
        decode batching, with the first token the prefill sampled."""
        self.scheduler.add_running(req)
        self._append_token(req, first_token, time.time())

    def abort(self, req: Request) -> None:
        """Drops a request wherever it is and frees its blocks."""
        if not req.is_finished:
            self._finish(req, "abort", text=req.output_text)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished or self._inflight is not None

    def step(self) -> list[RequestOutput]:
        """Runs one batch; returns the outputs of every request that advanced. With overlap, a
        greedy decode step is launched and the outputs are those of the step launched before."""
        outputs = []
        if self._inflight is not None and not self.scheduler.is_steady():
            outputs = self._read_inflight()  # admitting or preempting needs every token read
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return outputs + self._read_inflight()
        chunks = [_decode_chunk(r) for r in plan.decodes]
        if self._can_overlap(plan, chunks):
            return outputs + self._overlapped_step(plan.decodes, chunks)
        outputs += self._read_inflight()
        decodes = [r for r in plan.decodes if not r.is_finished]  # some may have ended just now
        return outputs + self._plain_step(plan.prefills, decodes)

    def _plain_step(self, prefill_reqs: list[Request], decode_reqs: list[Request]) -> list[RequestOutput]:
        """Runs the batch, samples, and reads the tokens back before returning."""
        prefills = [SeqChunk(r.all_token_ids, 0, r.block_ids) for r in prefill_reqs]
        decodes = [_decode_chunk(r) for r in decode_reqs]
        if not decodes and not prefills:
            return []
        if not prefills and self.graphs is not None and self.graphs.can_run(decodes):
            logits = self.graphs.run(decodes)
        else:
            batch = Batch.build(prefills, decodes, self.kv_cache.block_size, self.device)
            logits = self.model(batch, self.kv_cache)
        reqs = prefill_reqs + decode_reqs
        tokens = sample(logits, [r.sampling_params for r in reqs], [r.generator for r in reqs])
        now = time.time()
        for req, token in zip(reqs, tokens):
            self._append_token(req, token, now)
        return [RequestOutput.of(r) for r in reqs]

    def _can_overlap(self, plan: SchedulerOutput, chunks: list[SeqChunk]) -> bool:
        if self.overlap is None or plan.prefills or not all(r.sampling_params.is_greedy for r in plan.decodes):
            return False
        return self.graphs is None or self.graphs.can_run(chunks)

    def _overlapped_step(self, reqs: list[Request], chunks: list[SeqChunk]) -> list[RequestOutput]:
        """Launches this step, then reads the one launched before while the GPU runs it."""
        before = self._inflight
        rows = {id(r): i for i, r in enumerate(before.reqs)} if before else {}
        # A request whose newest token is still on the GPU takes it from the step before's row.
        feedback = [rows[id(r)] if r.output_token_ids[-1:] == [PENDING] else -1 for r in reqs]
        tokens = self.overlap.launch(chunks, feedback)
        for req in reqs:
            req.output_token_ids.append(PENDING)
        self._inflight = InFlight(reqs, tokens)
        return self._read(before)

    def _read_inflight(self) -> list[RequestOutput]:
        """Waits for the launched step, if any, and takes in its tokens."""
        step, self._inflight = self._inflight, None
        return self._read(step)

    def _read(self, step: InFlight | None) -> list[RequestOutput]:
        """Puts a launched step's tokens in place of its PENDING ones, then checks for stops."""
        if step is None:
            return []
        now, read = time.time(), []
        for req, token in zip(step.reqs, step.tokens.result()):
            if req.is_finished:
                continue  # ended (a stop, an abort) while the step ran: its token is dropped
            ids = req.output_token_ids
            # this step's token is the oldest PENDING one: the last, or the one before it when
            # the step launched after this one holds the request too
            index = len(ids) - 2 if len(ids) > 1 and ids[-2] == PENDING else len(ids) - 1
            assert ids[index] == PENDING, "a running request in a launched step has its token pending"
            ids[index] = token
            self._check_stop(req, index, now)
            read.append(req)
        self.kv_cache.allocator.free(step.held_blocks)
        return [RequestOutput.of(r) for r in read]

    def _append_token(self, req: Request, token: int, now: float) -> None:
        req.output_token_ids.append(token)
        self._check_stop(req, len(req.output_token_ids) - 1, now)

    def _check_stop(self, req: Request, index: int, now: float) -> None:
        """Ends req if its output token `index` (the newest read) stops it."""
        token, num_output = req.output_token_ids[index], index + 1
        req.metrics.first_token_time = req.metrics.first_token_time or now
        params = req.sampling_params
        if params.stop and self.tokenizer is not None:
            req.detokenizer = req.detokenizer or IncrementalDetokenizer(self.tokenizer)
            text = req.detokenizer.update(req.output_token_ids[:num_output])
            for stop in params.stop:
                cut = text.find(stop)
                if cut >= 0:
                    return self._finish(req, "stop", stop, text=text[:cut])
            req.output_text = text
        if token in params.stop_token_ids:
            self._finish(req, "stop", token)
        elif token in self.eos_token_ids and not params.ignore_eos:
            self._finish(req, "stop")
        elif num_output >= params.max_tokens or len(req.prompt_token_ids) + num_output >= self.max_model_len:
            self._finish(req, "length")

    def _finish(self, req: Request, reason: str, stop_reason: int | str | None = None,
                text: str | None = None) -> None:
        """Ends req: drops tokens still on the GPU, and frees its blocks, after the launched step
        if that step holds it (the step still writes its K/V)."""
        req.output_token_ids = req.read_token_ids
        req.output_text = self.detokenize(req.output_token_ids) if text is None else text
        if self._inflight is not None and self._inflight.holds(req):
            self._inflight.held_blocks += req.block_ids
            req.block_ids = []
        self.scheduler.finish(req, reason, stop_reason)

    def detokenize(self, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _tokenize(self, prompt: Prompt) -> tuple[list[int], str | None]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" not in prompt:
                raise InvalidRequestError("a dict prompt needs 'prompt_token_ids'")
            prompt = list(prompt["prompt_token_ids"])
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("text prompts need a tokenizer; pass token ids")
            return self.tokenizer(prompt).input_ids, prompt
        if not all(isinstance(t, int) for t in prompt):
            raise InvalidRequestError("prompt token ids must be integers")
        return list(prompt), None


def _decode_chunk(req: Request) -> SeqChunk:
    return SeqChunk([req.last_token_id], req.num_tokens - 1, req.block_ids)


def _overlap(config: EngineConfig, graphs: DecodeGraphs | None, model: Qwen3ForCausalLM,
             kv_cache: KVCache) -> DecodeGraphs | EagerSteps | None:
    """What launches overlapped steps: the CUDA graphs ("auto" and "on"), eager steps ("on")."""
    if config.async_scheduling == "off" or (graphs is None and config.async_scheduling == "auto"):
        return None
    return graphs or EagerSteps(model, kv_cache)


def _max_model_len(config: EngineConfig, model_config: ModelConfig, kv_cache: KVCache,
                   reserved_blocks: int = 0) -> int:
    """The longest prompt + output a request may have: it must fit the cache on its own."""
    wanted = config.max_model_len or model_config.max_position_embeddings
    room = (kv_cache.num_blocks - reserved_blocks) * kv_cache.block_size
    if config.max_model_len and config.max_model_len > room:
        raise RequestTooLargeError(
            f"max_model_len={config.max_model_len} does not fit: the KV cache holds {room} tokens "
            f"({kv_cache.num_blocks} blocks, {reserved_blocks} kept for CUDA graphs); raise kv_memory_gb")
    if wanted > room:
        log.warning("max_model_len lowered from %d to %d, what the KV cache holds", wanted, room)
    return min(wanted, room)


class LLM:
    """Offline generation, as in vLLM: LLM(model).generate(prompts, SamplingParams(...))."""

    def __init__(self, model: str = "demo", device: str | None = None, dtype: str | None = None,
                 kv_memory_gb: float | None = None, **kwargs) -> None:
        config = EngineConfig(model=model, device=device, dtype=dtype, kv_memory_gb=kv_memory_gb, **kwargs)
        self.engine = LLMEngine.from_config(config)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Runs every prompt to completion with continuous batching; outputs in prompt order."""
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        return run_to_completion(self.engine, prompts, params, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Applies the checkpoint's chat template to each conversation, then generates."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": apply_chat_template(self.engine.tokenizer, c)} for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)


def warm_up(engine: LLMEngine) -> None:
    """Two decode steps on a tiny prompt, so the first request does not pay for lazy set-up
    (compiled kernels, and on CUDA the decode graphs, which are captured on first use, prefill
    attention at every prompt-length bucket, and every variant of the decode attention kernel
    that eager steps mixing prompts and decodes can launch)."""
    run_to_completion(engine, [[1, 2, 3, 4]], SamplingParams(max_tokens=2, temperature=0.0))
    warm_up_prompts(engine.model, engine.max_model_len)
    if engine.device.type == "cuda":
        from hma.kernels import warm_up_decode  # Triton ships with CUDA builds of torch

        c = engine.model.config
        t0 = time.perf_counter()
        launches = warm_up_decode(engine.kv_cache.layers[0], c.num_attention_heads, c.head_dim,
                                  engine.max_model_len, engine.model.embed_tokens.weight.dtype)
        log.info("ran decode attention in its %d launch variants in %.1f s", launches, time.perf_counter() - t0)


def warm_up_prompts(model: Qwen3ForCausalLM, max_len: int) -> None:
    """Builds prefill attention for every prompt-length bucket up to max_len and captures the
    piecewise graphs of every token-count bucket (CUDA only)."""
    t0 = time.perf_counter()
    c, weight = model.config, model.embed_tokens.weight
    built = warm_up_prefill(c.num_attention_heads, c.num_key_value_heads, c.head_dim, max_len,
                            weight.dtype, weight.device)
    if built:
        log.info("ran prefill attention at %d prompt lengths up to %d tokens in %.1f s", built, max_len,
                 time.perf_counter() - t0)
    if model.piecewise is not None:
        model.piecewise.capture()


def run_to_completion(engine: LLMEngine, prompts: Sequence[Prompt], params: SamplingParams,
                      use_tqdm: bool = False) -> list[RequestOutput]:
    """Adds all prompts, steps until each is finished, returns outputs in order."""
    reqs = []
    try:
        for prompt in prompts:
            reqs.append(engine.add_request(prompt, params))
    except Exception:
        for req in reqs:  # one bad prompt refuses the call without leaving the others queued
            engine.abort(req)
        raise
    done: dict[str, RequestOutput] = {}
    with tqdm(total=len(reqs), desc="generate", disable=not use_tqdm) as bar:
        while engine.has_unfinished:
            for out in engine.step():
                if out.finished and out.request_id not in done:
                    done[out.request_id] = out
                    bar.update(1)
    return [done[r.request_id] for r in reqs]
