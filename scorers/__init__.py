"""refundguard scorers: pure functions from prepared inputs to a score in [0, 1] with reasons."""
