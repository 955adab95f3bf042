"""Makes the ``*_tiny_optimum.onnx`` decoders: small causal language models of six
architectures with random (seeded) weights, saved by transformers and exported by Hugging Face
optimum with their KV cache.

Not run by the tests (they read the committed files); needs torch, transformers and
optimum-onnx, which smlaas does not depend on:

    pip install torch==2.13.0 transformers==4.57.6 optimum==2.1.0 optimum-onnx==0.1.0
    for arch in gpt2 llama phi3 gemma gpt_neox opt; do
        python tests/data/hf_decoder/make_decoders.py $arch /tmp/$arch
        optimum-cli export onnx --model /tmp/$arch --task text-generation-with-past \\
            --opset 17 /tmp/${arch}_onnx
        cp /tmp/${arch}_onnx/model.onnx tests/data/hf_decoder/${arch}_tiny_optimum.onnx
    done

``llama_tiny_genai.onnx`` is the ``llama_genai`` configuration (head size 16, which ONNX
Runtime's GroupQueryAttention needs) built by ONNX Runtime GenAI's model builder instead:

    pip install onnxruntime-genai==0.10.0 onnx_ir
    python tests/data/hf_decoder/make_decoders.py llama_genai /tmp/llama_genai
    python -m onnxruntime_genai.models.builder -m /tmp/llama_genai -i /tmp/llama_genai \
        -o /tmp/llama_genai_onnx -p fp32 -e cpu -c /tmp/genai_cache
    python -c "import onnx; onnx.save(onnx.load('/tmp/llama_genai_onnx/model.onnx'),
                                      'tests/data/hf_decoder/llama_tiny_genai.onnx')"

(the builder writes the model, then stops on the missing tokenizer: the model is complete).
"""

import sys

import torch
import transformers as hf

SMALL = {"vocab_size": 257, "bos_token_id": 256, "eos_token_id": 256,
         "initializer_range": 0.4}  # larger than the usual 0.02: greedy tokens vary
LAYERS = {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 32,
          "intermediate_size": 64, "max_position_embeddings": 128}
ARCHITECTURES = {
    "gpt2": (hf.GPT2Config, hf.GPT2LMHeadModel,
             {"n_layer": 2, "n_embd": 32, "n_head": 4, "n_positions": 128}),
    # rotary positions, grouped-query attention (2 key/value heads for 4), RMSNorm
    "llama": (hf.LlamaConfig, hf.LlamaForCausalLM,
              {**LAYERS, "num_key_value_heads": 2, "tie_word_embeddings": False}),
    # one fused QKV projection and one fused gate/up projection
    "phi3": (hf.Phi3Config, hf.Phi3ForCausalLM, {**LAYERS, "pad_token_id": 0}),
    "llama_genai": (hf.LlamaConfig, hf.LlamaForCausalLM,
                    {**LAYERS, "hidden_size": 64, "intermediate_size": 128,
                     "num_key_value_heads": 2, "tie_word_embeddings": False}),
    # multi-query attention (one key/value head), an explicit head_dim
    "gemma": (hf.GemmaConfig, hf.GemmaForCausalLM,
              {**LAYERS, "num_key_value_heads": 1, "head_dim": 8}),
    # attention and MLP in parallel, partial rotary positions
    "gpt_neox": (hf.GPTNeoXConfig, hf.GPTNeoXForCausalLM, LAYERS),
    # learned positions with an offset, pre-norm decoder
    "opt": (hf.OPTConfig, hf.OPTForCausalLM,
            {"hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "max_position_embeddings": 128,
             "word_embed_proj_dim": 32, "init_std": 0.4}),
}

if __name__ == "__main__":
    architecture, out = sys.argv[1], sys.argv[2]
    config_type, model_type, options = ARCHITECTURES[architecture]
    torch.manual_seed(0)
    model_type(config_type(**SMALL, **options)).eval().save_pretrained(out)
    print(f"{architecture} saved to {out} with torch {torch.__version__}, "
          f"transformers {hf.__version__}")
