"""The Responses API: create, retrieve, stream again from any event, cancel, delete."""
