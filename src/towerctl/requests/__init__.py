"""A request on a session: the rules a message must meet (`rules`), the session's lease
(`lease`), the recorded request and its charge (`record`), one request served from start to
finish (`serve`) and a batch of them under one kept lease (`batch`)."""
