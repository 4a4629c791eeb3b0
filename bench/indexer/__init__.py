"""The indexer benchmark: catch-up throughput, the fetch-only floor, live latency, memory."""
