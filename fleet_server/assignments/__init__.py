"""What each device must run: the assignment document, its writer and the check-in cache."""
