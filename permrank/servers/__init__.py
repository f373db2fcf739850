"""Model servers permrank can start and stop itself: llama.cpp's server, vLLM's server."""
