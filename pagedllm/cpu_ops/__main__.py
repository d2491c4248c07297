"""`python -m pagedllm.cpu_ops --build`: builds the CPU ops' extension now."""

from pagedllm.cpu_ops import main

main()
