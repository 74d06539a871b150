"""Training: optimizer roles (AdamW / Muon), schedules, the loop, chat fine-tuning."""
