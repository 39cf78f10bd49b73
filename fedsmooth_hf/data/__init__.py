"""Layer 2, data: how a training set is split over clients (IID, Dirichlet, by column), its table and plot."""
