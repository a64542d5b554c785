"""The simulated site: scenario, pymodbus meter, load model, virtual boards, measurements."""
