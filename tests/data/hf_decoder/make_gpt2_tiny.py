"""Makes gpt2_tiny_optimum.onnx: a GPT-2 (2 layers, d_model 32, 4 heads, a vocabulary of 257,
128 positions) with random weights, exported by Hugging Face optimum with its KV cache.

Not run by the tests (they read the committed file); needs torch, transformers and
optimum-onnx, which smlaas does not depend on:

    pip install torch==2.13.0 transformers==4.57.6 optimum==2.1.0 optimum-onnx==0.1.0
    python tests/data/hf_decoder/make_gpt2_tiny.py /tmp/gpt2_tiny
    optimum-cli export onnx --model /tmp/gpt2_tiny --task text-generation-with-past \\
        --opset 17 /tmp/gpt2_tiny_onnx
    cp /tmp/gpt2_tiny_onnx/model.onnx tests/data/hf_decoder/gpt2_tiny_optimum.onnx
"""

import sys

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

torch.manual_seed(0)
config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=257, n_positions=128,
                    bos_token_id=256, eos_token_id=256,
                    initializer_range=0.4)  # larger than GPT-2's 0.02: greedy tokens vary
GPT2LMHeadModel(config).eval().save_pretrained(sys.argv[1])
print(f"saved to {sys.argv[1]} with torch {torch.__version__}, "
      f"transformers {transformers.__version__}")
