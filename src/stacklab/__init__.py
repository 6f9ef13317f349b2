"""stacklab: a full, hackable LLM stack and an integration engine.

The stack (data → tokenizer → shards → model → pretrain → SFT → RL → eval) is driven by one
declarative recipe; every stage's output is cached by the hash of what it depends on, so
recipes that share a prefix share the work.
"""

__version__ = "0.1.0"
