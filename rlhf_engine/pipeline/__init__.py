"""The InstructGPT pipeline: data formats, the built-in synthetic task, and the
SFT, reward-model and PPO stages.

Import the submodules directly (``rlhf_engine.pipeline.data``,
``rlhf_engine.pipeline.task``); this package imports nothing so that reading
data never pulls in torch or transformers.
"""
