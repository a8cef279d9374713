"""The OpenAI-compatible endpoint: a thin Starlette app, served by uvicorn on a thread of its own, in front of
the same `Scheduler` instance as the Triton model -- it runs inside the Triton Python backend's process
(`TritonBackend` starts it when the repository's `openai_port` is set), so requests from both fronts share one
running batch.

    client --HTTP/SSE--> uvicorn (event loop thread) --submit--> Scheduler (its thread) --on_event--> loop

    GET  /v1/models, /v1/models/{model}
    POST /v1/completions        prompt: text, token ids, or a list of either; n, echo, logprobs, stream, ...
    POST /v1/chat/completions   where the artifact has a chat template (else 400, naming it)

The scheduler's callbacks run on its thread and only hand items to the event loop (`call_soon_threadsafe`);
they never raise into the scheduler (a raising callback would end every row of the step, Triton's too).
A client that goes away (stream closed, or disconnected while waiting) cancels its rows.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

from neoxrt.errors import NeoxrtError
from neoxrt.runtime import Generator
from neoxrt.runtime.sampling import GenerationOptions
from neoxrt.runtime.scheduler import QueueFullError, Scheduler, SchedulerDown
from neoxrt.serve.openai_api import (
    FINISH,
    ApiError,
    ApiRequest,
    Choice,
    chat_request,
    chat_template,
    completion_request,
    envelope,
    logprobs_block,
    new_id,
    parse_body,
    usage,
)
from neoxrt.serve.repository import ServeError

WAIT_S = 0.2  # a non-streaming request checks this often whether its client is still there (its row is
# dropped at the scheduler's next step after that)
RETRY_AFTER_S = 1  # the Retry-After a full queue answers with


class _Run:
    """The choices of one request, fed from the scheduler's thread through the event loop's queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop, choices: list[Choice]):
        self.loop, self.choices, self.left = loop, choices, len(choices)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.closed = False  # the request ended or its client went away: the scheduler drops its rows

    def _put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed (server stopping): nobody waits any more
            self.closed = True

    def callbacks(self, choice: Choice, prompt_scores: bool) -> dict:
        return dict(on_event=lambda e: self._put((choice, "token", e)),
                    on_error=lambda exc: self._put((choice, "error", exc)),
                    is_cancelled=lambda: self.closed,
                    on_prompt_logprobs=(lambda p: self._put((choice, "prompt", p))) if prompt_scores else None)

    def apply(self, choice: Choice, kind: str, payload, logprobs: bool):
        """Record one item; returns the token event (None for prompt scores). Raises the step's error."""
        if kind == "error":
            raise payload
        if kind == "prompt":
            choice.prompt_scores = payload
            return None
        choice.ids.append(payload.token_id)
        if logprobs:
            choice.scores.append((payload.logprob, payload.top_logprobs))
        if payload.finish_reason:
            choice.finish_reason = payload.finish_reason
            self.left -= 1
        return payload


class OpenAIFrontend:
    """The app and its uvicorn server thread. `start()` returns once the port is bound."""

    def __init__(self, scheduler: Scheduler, generator: Generator, name: str, artifact: Path, host: str, port: int):
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.routing import Route

        self.scheduler, self.generator, self.name = scheduler, generator, name
        self.host, self.port, self.created = host, port, int(time.time())
        self.template = chat_template(artifact)
        self.tokenizer = generator.tokenizer
        routes = [Route("/v1/models", self.models), Route("/v1/models/{model:path}", self.model),
                  Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/chat/completions", self.chat, methods=["POST"]), Route("/health", self.health),
                  Route("/metrics", self.metrics)]

        async def http_error(request, exc: HTTPException):
            return self._error(ApiError(f"{request.method} {request.url.path}: {exc.detail}", None, exc.status_code))

        self.app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
        self.server = None
        self.thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self, timeout: float = 20.0) -> None:
        """Raises: ServeError when the port cannot be bound in `timeout` seconds."""
        import uvicorn

        config = uvicorn.Config(self.app, host=self.host, port=self.port, log_level="warning", access_log=False,
                                lifespan="off", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)  # not on the main thread: it installs no signal handlers
        self.thread = threading.Thread(target=self.server.run, name="neoxrt-openai", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ServeError(f"the OpenAI endpoint could not listen on {self.host}:{self.port} (port in use?)")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(5)

    # -- routes -------------------------------------------------------------------------------------------
    def _card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "neoxrt",
                "max_model_len": self.generator.max_positions}

    async def health(self, request):
        """200 while the scheduler serves; 503 with the reason when its loop has died or is stuck (the watchdog)."""
        from starlette.responses import Response

        down = self.scheduler.health()
        return Response(status_code=200) if down is None else Response(down, status_code=503)

    async def metrics(self, request):
        from starlette.responses import Response

        from neoxrt.serve.metrics import prometheus_text

        return Response(prometheus_text(self.scheduler.stats, self.name), media_type="text/plain; version=0.0.4")

    async def models(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse({"object": "list", "data": [self._card()]})

    async def model(self, request):
        from starlette.responses import JSONResponse

        if request.path_params["model"] != self.name:
            return self._error(ApiError(f"The model `{request.path_params['model']}` does not exist", "model", 404,
                                        code="model_not_found"))
        return JSONResponse(self._card())

    async def completions(self, request):
        return await self._serve(request, lambda body: completion_request(body, self.name))

    async def chat(self, request):
        return await self._serve(request, lambda body: chat_request(body, self.name, self.template))

    async def _serve(self, request, parse):
        from starlette.responses import StreamingResponse

        try:
            req: ApiRequest = parse(parse_body(await request.body()))
            prompts = [self._encode(p, req) for p in req.prompts]
            await self._compile(req)
            run = self._submit(req, prompts)
        except ApiError as exc:
            return self._error(exc)
        rid = new_id(req.chat)
        if req.stream:
            return StreamingResponse(self._stream(run, req, prompts, rid), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await self._whole(request, run, req, prompts, rid)

    # -- submitting -----------------------------------------------------------------------------------------
    async def _compile(self, req: ApiRequest) -> None:
        """Compile the request's constraint on a worker thread (time-limited; cached, so submit finds it), keeping
        the event loop free while it compiles.

        Raises:
            ApiError: 400 with the engine's reason (invalid schema, regex or grammar, or too slow to compile).
        """
        spec = req.options.get("structured_outputs")
        if spec is None:
            return
        try:
            await asyncio.to_thread(self.generator.grammars.constraint, spec)
        except NeoxrtError as exc:
            raise ApiError(str(exc), req.format_param) from None

    def _encode(self, prompt, req: ApiRequest) -> list[int]:
        try:
            (ids,) = self.generator.encode([prompt])
        except NeoxrtError as exc:
            raise ApiError(f"prompt: {exc}", "messages" if req.chat else "prompt") from None
        context = self.generator.max_positions
        if len(ids) + max(req.max_tokens, 1) > context:
            name = "max_completion_tokens" if req.chat else "max_tokens"
            raise ApiError(f"This model's maximum context length is {context} tokens; the prompt has {len(ids)} and "
                           f"{name} asks for {req.max_tokens} more", name if len(ids) < context else "prompt",
                           code="context_length_exceeded")
        return ids

    def _submit(self, req: ApiRequest, prompts: list[list[int]]) -> _Run:
        """Every choice (prompt-major, n each) to the scheduler; on a refusal the submitted ones are cancelled."""
        choices = [Choice(p * req.n + k, ids) for p, ids in enumerate(prompts) for k in range(req.n)]
        if len(choices) > self.scheduler.max_queue:  # could never be queued at once: busy for ever, not for now
            raise ApiError(f"this request asks for {len(prompts)} prompts x n {req.n} = {len(choices)} rows; this server "
                           f"queues at most {self.scheduler.max_queue} (--max-queue)", "n" if req.n > 1 else "prompt")
        if req.n > 1 and GenerationOptions(**self.generator._with_defaults(
                [prompts[0]], {**req.options, "max_new_tokens": max(req.max_tokens, 1)}, beams=False)).greedy:
            raise ApiError("n > 1 needs sampling (temperature > 0): this model's defaults are greedy, so the n choices "
                           "would be identical", "n")
        run = _Run(asyncio.get_running_loop(), choices)
        try:
            for choice in choices:
                options = {**req.options, "max_new_tokens": max(req.max_tokens, 1)}  # 0 (echo): one token, dropped
                if req.seed is not None:
                    options["seed"] = (req.seed + choice.index % req.n) % 2**63
                scored = req.echo and req.logprobs is not None
                self.scheduler.submit(choice.prompt_ids, **run.callbacks(choice, scored), **options)
        except QueueFullError as exc:
            run.closed = True
            raise ApiError(str(exc), None, 429, "server_error", "server_busy") from None
        except SchedulerDown as exc:
            run.closed = True
            raise ApiError(str(exc), None, 503, "server_error", "scheduler_down") from None
        except NeoxrtError as exc:
            run.closed = True
            raise ApiError(str(exc), _field_of(str(exc))) from None
        return run

    # -- answers --------------------------------------------------------------------------------------------
    async def _whole(self, request, run: _Run, req: ApiRequest, prompts, rid: str):
        from starlette.responses import JSONResponse, Response

        watcher = asyncio.create_task(self._watch(request, run))
        try:
            while run.left:
                try:
                    choice, kind, payload = await asyncio.wait_for(run.queue.get(), WAIT_S)
                except asyncio.TimeoutError:
                    if run.closed:  # the client went away: its rows leave at the scheduler's next step
                        return Response(status_code=499)
                    continue
                run.apply(choice, kind, payload, req.logprobs is not None)
        except Exception as exc:  # a failed scheduler step
            return self._error(ApiError(f"generation failed: {exc}", None, 500, "server_error"))
        finally:
            run.closed = True
            watcher.cancel()
        body = [self._choice_body(c, req) for c in run.choices]
        return JSONResponse(envelope(rid, self.name, req.chat, False, body,
                                     {"usage": usage(run.choices, prompts, req.max_tokens > 0)}))

    @staticmethod
    async def _watch(request, run: _Run) -> None:
        """Every `WAIT_S` while a non-streaming request waits: a client that has gone closes its run (tokens may
        keep arriving meanwhile, so this cannot wait for a pause in them)."""
        while not run.closed:
            if await request.is_disconnected():
                run.closed = True
                return
            await asyncio.sleep(WAIT_S)

    def _choice_body(self, c: Choice, req: ApiRequest) -> dict:
        new = c.ids if req.max_tokens else []
        text = self._text(new, req)
        reason = FINISH[c.finish_reason] if req.max_tokens else "length"
        if req.chat:
            return {"index": c.index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": reason}
        echoed = self._decode(c.prompt_ids) if req.echo else ""
        block = None
        if req.logprobs is not None:
            ids = (c.prompt_ids if req.echo else []) + new
            scores = ((c.prompt_scores or [None] * len(c.prompt_ids)) if req.echo else []) + c.scores[:len(new)]
            block = logprobs_block(self.tokenizer, ids, scores, 0)
        return {"index": c.index, "text": echoed + text, "logprobs": block, "finish_reason": reason}

    async def _stream(self, run: _Run, req: ApiRequest, prompts, rid: str):
        """Server-sent events: one chunk per token (a choice's echo first), `data: [DONE]` last."""
        extra = {"usage": None} if req.include_usage else None
        chunk = lambda body: "data: " + json.dumps(envelope(rid, self.name, req.chat, True, [body], extra)) + "\n\n"  # noqa: E731
        try:
            for c in run.choices:
                if req.chat:
                    yield chunk({"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None})
                elif req.echo and req.logprobs is None:
                    yield chunk({"index": c.index, "text": self._decode(c.prompt_ids), "logprobs": None,
                                 "finish_reason": None})
            while run.left:
                choice, kind, payload = await run.queue.get()
                event = run.apply(choice, kind, payload, req.logprobs is not None)
                body = self._chunk_body(choice, event, req)
                if body is not None:
                    yield chunk(body)
            if req.include_usage:
                body = envelope(rid, self.name, req.chat, True, [], {"usage": usage(run.choices, prompts, req.max_tokens > 0)})
                yield "data: " + json.dumps(body) + "\n\n"
        except Exception as exc:  # a failed scheduler step: the error as the last event
            yield "data: " + json.dumps(ApiError(f"generation failed: {exc}", None, 500, "server_error").body()) + "\n\n"
        finally:
            run.closed = True
        yield "data: [DONE]\n\n"

    def _chunk_body(self, c: Choice, event, req: ApiRequest) -> dict | None:
        if event is None:  # the prompt's scores (echo + logprobs): the echoed prompt with them
            text = self._decode(c.prompt_ids)
            return {"index": c.index, "text": text, "finish_reason": None,
                    "logprobs": logprobs_block(self.tokenizer, c.prompt_ids, c.prompt_scores, 0)}
        final = event.finish_reason is not None
        if req.max_tokens == 0:  # echo only: the one token drawn is not part of the answer
            return {"index": c.index, "text": "", "logprobs": None, "finish_reason": "length"} if final else None
        text = event.text
        if final:  # what is left of the whole text, stop strings cut (a held-back character, text before a stop)
            full = self._text(c.ids, req)
            text = full[len(c.sent):] if full.startswith(c.sent) else ""
        offset = len(c.sent) + (len(self._decode(c.prompt_ids)) if req.echo else 0)
        c.sent += text
        reason = FINISH[event.finish_reason] if final else None
        if req.chat:
            return {"index": c.index, "delta": {"content": text} if text else {}, "logprobs": None,
                    "finish_reason": reason}
        block = None
        if req.logprobs is not None:
            block = logprobs_block(self.tokenizer, [event.token_id], [(event.logprob, event.top_logprobs)], offset)
        return {"index": c.index, "text": text, "logprobs": block, "finish_reason": reason}

    # -- text -----------------------------------------------------------------------------------------------
    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    def _text(self, ids: list[int], req: ApiRequest) -> str:
        return Generator._truncate(self._decode(ids), tuple(req.options.get("stop_strings", ())))

    @staticmethod
    def _error(exc: ApiError):
        from starlette.responses import JSONResponse

        headers = {"Retry-After": str(RETRY_AFTER_S)} if exc.status == 429 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def _field_of(message: str) -> str | None:
    """The OpenAI field a runtime refusal is about (the runtime names its own keywords)."""
    for ours, theirs in (("max_new_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p"),
                         ("top_k", "top_k"), ("seed", "seed"), ("logprobs", "logprobs"), ("stop", "stop"),
                         ("repetition_penalty", "repetition_penalty"), ("prompt", "prompt")):
        if ours in message:
            return theirs
    return None
