"""The gateway: one OpenAI-compatible endpoint in front of a deployment (app.py), the scheduler that
starts, swaps and stops servers inside the memory budget (scheduler.py), the runtime behind it
(backend.py), and how it is served and supervised (serve.py, supervise.py)."""
