"""The quantization core of AI-QS: widths and configurations, the quantizer, its placement at the
model's declared tensors and layers, the cost models, the trace, evaluation of many
configurations, the searches and their statistics. No file I/O and no argparse live here: the
pipeline stages (utils/stages/) and command-line tools read files and flags and call into it."""
