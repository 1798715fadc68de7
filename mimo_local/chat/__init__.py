"""`mimo chat`: conversation state with KV reuse, saved sessions, slash commands, and two front ends
(the Textual app for terminals, a plain line REPL for pipes)."""
