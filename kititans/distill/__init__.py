"""Distillation data: teacher-written chats over any OpenAI-compatible endpoint (`kititans distill gen`) and
teacher top-k log-probabilities of given text (`kititans distill score`).

A data-level floor: it imports data/ (chat format, tokenizer) and writes files that `kititans sft` and
kititans/train/distill.py read; it never imports models/ or train/. The HTTP client (httpx) is the optional
extra `kititans[distill]`, imported only by the modules that talk to an endpoint.
"""
