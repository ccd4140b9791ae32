"""The library every Threadline service uses: subjects, message schemas, bus, telemetry, config, store."""
