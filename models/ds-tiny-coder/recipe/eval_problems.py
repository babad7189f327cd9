"""Small function-completion problems for the built-in model, written for this recipe and
kept out of its corpus: prepare.py drops every corpus file that contains a problem's
docstring (``contaminated``). A completion is scored by running the problem's asserts
against ``prompt + completion``, the problem's only code.

Each problem: ``name`` (the function), ``prompt`` (signature and docstring, as the model
sees it) and ``tests`` (assert statements).
"""

from __future__ import annotations

import re

PROBLEMS: list[dict[str, str]] = [
    {"name": "add", "prompt": 'def add(a, b):\n    """Return the sum of a and b."""\n',
     "tests": "assert add(2, 3) == 5\nassert add(-1, 1) == 0\nassert add(0.5, 0.25) == 0.75"},
    {"name": "square", "prompt": 'def square(x):\n    """Return x multiplied by itself."""\n',
     "tests": "assert square(3) == 9\nassert square(-4) == 16\nassert square(0) == 0"},
    {"name": "first_item",
     "prompt": 'def first_item(items):\n    """Return the first element of the list items."""\n',
     "tests": "assert first_item([7, 8, 9]) == 7\nassert first_item(['a']) == 'a'"},
    {"name": "reverse_string",
     "prompt": 'def reverse_string(s):\n    """Return the string s reversed."""\n',
     "tests": "assert reverse_string('abc') == 'cba'\nassert reverse_string('') == ''"},
    {"name": "last_item",
     "prompt": 'def last_item(items):\n    """Return the last element of the list items."""\n',
     "tests": "assert last_item([1, 2, 3]) == 3\nassert last_item(['x', 'y']) == 'y'"},
    {"name": "is_even",
     "prompt": 'def is_even(n):\n    """Return True if the integer n is even, else False."""\n',
     "tests": "assert is_even(4) is True\nassert is_even(7) is False\nassert is_even(0) is True"},
    {"name": "subtract", "prompt": 'def subtract(a, b):\n    """Return a minus b."""\n',
     "tests": "assert subtract(5, 3) == 2\nassert subtract(0, 4) == -4"},
    {"name": "multiply", "prompt": 'def multiply(a, b):\n    """Return the product of a and b."""\n',
     "tests": "assert multiply(3, 4) == 12\nassert multiply(-2, 5) == -10"},
    {"name": "cube", "prompt": 'def cube(x):\n    """Return x raised to the third power."""\n',
     "tests": "assert cube(2) == 8\nassert cube(-3) == -27"},
    {"name": "list_length",
     "prompt": 'def list_length(items):\n    """Return how many elements the list items has."""\n',
     "tests": "assert list_length([1, 2, 3]) == 3\nassert list_length([]) == 0"},
    {"name": "largest",
     "prompt": 'def largest(numbers):\n    """Return the largest number in the non-empty list numbers."""\n',
     "tests": "assert largest([3, 9, 2]) == 9\nassert largest([-5, -1]) == -1"},
    {"name": "smallest",
     "prompt": 'def smallest(numbers):\n    """Return the smallest number in the non-empty list numbers."""\n',
     "tests": "assert smallest([3, 9, 2]) == 2\nassert smallest([-5, -1]) == -5"},
    {"name": "total", "prompt": 'def total(numbers):\n    """Return the sum of all numbers in the list."""\n',
     "tests": "assert total([1, 2, 3]) == 6\nassert total([]) == 0"},
    {"name": "average",
     "prompt": 'def average(numbers):\n    """Return the arithmetic mean of the non-empty list numbers."""\n',
     "tests": "assert average([1, 2, 3]) == 2\nassert average([5]) == 5"},
    {"name": "to_upper",
     "prompt": 'def to_upper(text):\n    """Return text with every letter in upper case."""\n',
     "tests": "assert to_upper('abc') == 'ABC'\nassert to_upper('a1b') == 'A1B'"},
    {"name": "absolute", "prompt": 'def absolute(x):\n    """Return the absolute value of the number x."""\n',
     "tests": "assert absolute(-3) == 3\nassert absolute(2) == 2\nassert absolute(0) == 0"},
    {"name": "maximum_of_two",
     "prompt": 'def maximum_of_two(a, b):\n    """Return the larger of the two numbers a and b."""\n',
     "tests": "assert maximum_of_two(1, 2) == 2\nassert maximum_of_two(5, -5) == 5"},
    {"name": "is_empty",
     "prompt": 'def is_empty(items):\n    """Return True when the list items has no elements."""\n',
     "tests": "assert is_empty([]) is True\nassert is_empty([0]) is False"},
    {"name": "count_char",
     "prompt": 'def count_char(text, char):\n    """Return how many times the character char occurs in text."""\n',
     "tests": "assert count_char('banana', 'a') == 3\nassert count_char('xyz', 'q') == 0"},
    {"name": "factorial",
     "prompt": 'def factorial(n):\n    """Return n! for a non-negative integer n."""\n',
     "tests": "assert factorial(0) == 1\nassert factorial(5) == 120"},
    {"name": "double_all",
     "prompt": 'def double_all(numbers):\n    """Return a new list with every number multiplied by two."""\n',
     "tests": "assert double_all([1, 2, 3]) == [2, 4, 6]\nassert double_all([]) == []"},
    {"name": "is_palindrome",
     "prompt": 'def is_palindrome(s):\n    """Return True if the string s reads the same backwards."""\n',
     "tests": "assert is_palindrome('level') is True\nassert is_palindrome('abc') is False"},
    {"name": "join_words",
     "prompt": 'def join_words(words):\n    """Return the strings in words joined by single spaces."""\n',
     "tests": "assert join_words(['a', 'b', 'c']) == 'a b c'\nassert join_words([]) == ''"},
    {"name": "celsius_to_fahrenheit",
     "prompt": 'def celsius_to_fahrenheit(c):\n    """Convert a temperature from Celsius to Fahrenheit."""\n',
     "tests": "assert celsius_to_fahrenheit(0) == 32\nassert celsius_to_fahrenheit(100) == 212"},
    {"name": "get_value",
     "prompt": 'def get_value(mapping, key, default):\n    """Return mapping[key], or default when key is missing."""\n',
     "tests": "assert get_value({'a': 1}, 'a', 0) == 1\nassert get_value({}, 'b', 7) == 7"},
]  # fmt: skip


def _docstring(prompt: str) -> str:
    return re.search(r'"""(.*?)"""', prompt, re.DOTALL).group(1).strip()


_DOCSTRINGS = [_docstring(p["prompt"]) for p in PROBLEMS]


def contaminated(text: str) -> str | None:
    """The name of a problem whose docstring the text contains, else None."""
    flat = " ".join(text.split())
    for problem, doc in zip(PROBLEMS, _DOCSTRINGS):
        if doc in flat:
            return problem["name"]
    return None
