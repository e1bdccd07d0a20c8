"""Adapting a trained Procgen agent to new visuals without rewards: the shared frame (core) and one module
per method (shot, anchored, bufr, pad)."""

from .core import (ADAPT_STATE, DIVERSITY_PRIORS, FRAMES_FILE, METHOD_MODULES, METHODS, ProcgenAdaptConfig,
                   ProcgenAdapter, TargetFrames, collect_frames, features_and_policy, load_source_agent,
                   paired_frames, parse_procgen_target, policy_divergence, policy_entropy)

__all__ = ["ADAPT_STATE", "DIVERSITY_PRIORS", "FRAMES_FILE", "METHOD_MODULES", "METHODS", "ProcgenAdaptConfig",
           "ProcgenAdapter", "TargetFrames", "collect_frames", "features_and_policy", "load_source_agent",
           "paired_frames", "parse_procgen_target", "policy_divergence", "policy_entropy"]
