"""Moving models between stacklab and other ecosystems (today: Hugging Face `transformers`)."""
