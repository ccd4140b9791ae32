"""The sandbox: wire-accurate platform fakes and a demo page, for `threadline up` and the tests."""
