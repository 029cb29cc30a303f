"""The distributed pipeline's services: verifier and drafter loops over Redis Streams, heartbeats,
recovery. ``workers/`` launches them as processes."""
