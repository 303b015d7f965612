"""llama-cpp-python's OpenAI-compatible server with llama.cpp's weight repacking off.

On hosts with Intel AMX, llama.cpp's repacking can crash the first request (ggml-org/llama.cpp#20824;
it does on this project's test machine) and ``python -m llama_cpp.server`` has no switch for it.
This runs the same server, with the same arguments, through
``alignment_artifacts.export_gguf.llama_cpp_without_repacking``:

    python examples/llama_cpp_server.py --model qwen-ablated.gguf --port 8080 --logits_all true
    alignment-artifacts evaluate --endpoint http://127.0.0.1:8080/v1 --endpoint-body '{"repeat_penalty": 1.0}' \\
        --model qwen2.5-coder-1.5b-instruct

(``--logits_all true`` lets the server return top log-probs, which `evaluate` turns into an approximate KL.)
"""

from alignment_artifacts.export_gguf import llama_cpp_without_repacking

if __name__ == "__main__":
    with llama_cpp_without_repacking():
        from llama_cpp.server.__main__ import main

        main()
