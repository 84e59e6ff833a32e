"""Serving: ``serve`` (FastAPI on uvicorn, ``layerviz serve``), its dynamic ``batching``, and the open-loop
``loadtest`` that measures it; ``config`` holds ``ServeConfig`` (torch-free)."""
