"""Protocol buffers of the serving API, and the script that generates their Python code."""
