"""The local store and how models get into it. One-way: `names` (what the user typed -> a ModelRef
and its directory, the store's location and settings) <- `download` (one file over HTTP, capped,
resumable, verified) <- `pull` (a whole repository: file list, confinement, lock, manifest) <-
`resolve` (a name to a directory, pulling with consent); `local` lists, shows and removes what is
there."""
