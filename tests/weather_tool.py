"""The tool the parser, scripted-checkpoint and server tests call: its schema, two calls, the question."""

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather forecast for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
PARIS = {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}
ROME = {"name": "get_weather", "arguments": {"city": "Rome", "days": 1}}
QUESTION = [{"role": "user", "content": "What will the weather be in Paris and Rome?"}]
