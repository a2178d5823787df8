"""The on-disk format of a prepared model: aligned safetensors shard files and a manifest."""
