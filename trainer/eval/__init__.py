"""Evaluations that run on a trained model: passkey retrieval and perplexity by position."""
