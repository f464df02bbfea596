"""``orion serve``: one model and its LoRA adapters behind the OpenAI HTTP API.

``engine`` runs generations one at a time on a worker thread in arrival order, ``protocol`` turns OpenAI request
bodies into engine requests and engine results into OpenAI response bodies, ``app`` is the ASGI application
(Starlette, served by uvicorn: the ``serve`` extra, imported only there).
"""
