"""The whole AvR pipeline as a graph of stages run by pluggable executors (`avr pipeline`)."""
