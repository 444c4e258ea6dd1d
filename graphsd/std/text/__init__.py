"""Text conditioning: the CLIP tokenizer shipped with graphsd, prompt weighting and encoding."""
